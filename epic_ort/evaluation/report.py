"""The evaluation's report: a markdown table, report.md, plot.png and report.json."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_bytes_atomic, write_json_atomic, write_text_atomic


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); NumPy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x




def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table (one row per method, then human) and the log-loss line."""
    head = ["method", "entropy rate", "calibration error [95% CI]", "distinct-2", "distinct-3", "rep-4",
            "mean tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in report["methods"]:
        ce = row["calibration_error"]
        ci = f" [{_fmt(ce['lo'])}, {_fmt(ce['hi'])}]" if ce.get("lo") is not None else ""
        name = row["name"]
        if row.get("alpha_source") == "calibration" and row.get("alpha") is not None:
            name += f" (alpha={row['alpha']:.3g})"
        cells = [name, _fmt(row["entropy_rate"]), _fmt(ce["value"]) + ci, _fmt(row["distinct_2"]),
                 _fmt(row["distinct_3"]), _fmt(row["rep_4"]), _fmt(row["mean_tokens"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    h = report["human"]
    cells = ["**human**", _fmt(h["entropy_rate"]), "–", _fmt(h["distinct_2"]), _fmt(h["distinct_3"]),
             _fmt(h["rep_4"]), _fmt(h["mean_tokens"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Model log-loss on the human continuations: {_fmt(h['log_loss'])} nats/token "
                 f"(perplexity {_fmt(h.get('perplexity'), 2)}).")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """report.md: title, the table, what the columns mean, and the settings."""
    s = report["settings"]
    corpus = ", ".join(f"{Path(f['path']).name} (sha256 {f['sha256'][:12]})" for f in report["corpus"]["files"])
    parts = [
        "# epic-ort evaluate",
        "",
        format_table(report),
        "",
        "Entropy rate: mean entropy (nats) of the base model's next-token distribution along the text "
        "(teacher forced, temperature 1, no processors). Calibration error: |entropy rate - human entropy rate|, "
        f"{int(report['methods'][0]['calibration_error']['level'] * 100) if report['methods'] else 95}% paired "
        f"bootstrap interval over prompts ({s['n_boot']} resamples). distinct-n: unique / total n-grams over "
        "all samples (token ids). rep-4: share of 4-grams already seen earlier in the same sample, averaged "
        "over samples.",
        "",
        "## Settings",
        "",
        f"- model: {report['model']['dir']} (sha256 {str(report['model']['sha256'])[:12]})",
        f"- corpus: {corpus}; {report['corpus']['tokens']} tokens",
        f"- prompts: {s['prompts']} passages of {s['prompt_tokens']} tokens; {s['max_new_tokens']} new tokens; "
        f"seed {s['seed']}",
        f"- EPIC: horizon {s['horizon']}, rollouts {s['rollouts']}"
        + (f", calibrated alpha {report['epic_alpha']:.4f}" if report.get("epic_alpha") is not None else ""),
        f"- position buckets: {s['buckets']}; batch size {s['batch_size']}",
        f"- created {report['created']}; {report.get('seconds', 0):.1f} s",
        "",
    ]
    if report.get("plot"):
        parts += [f"![entropy along the position]({report['plot']})", ""]
    return "\n".join(parts)


def plot_curves(report: dict[str, Any]) -> bytes:
    """plot.png: mean entropy per position bucket, one line per method, human in black (thicker).

    Uses matplotlib's Agg canvas directly (no pyplot), so it neither needs a display nor changes the
    backend of a caller that has pyplot open. matplotlib is imported here only (optional extra `plot`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = report["buckets"]["centers"]
    fig = Figure(figsize=(8, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def ys(values: list[Any]) -> list[float]:
        return [float("nan") if v is None else v for v in values]

    for row in report["methods"]:
        label = row["name"]
        if row.get("alpha_source") == "calibration" and row.get("alpha") is not None:
            label += f" (alpha={row['alpha']:.3g})"
        ax.plot(x, ys(row["curve"]), marker="o", markersize=3, linewidth=1.4, label=label)
    ax.plot(x, ys(report["human"]["curve"]), color="black", linewidth=3.0, marker="o", markersize=4, label="human")
    ax.set_xlabel("position in the continuation (tokens, bucket centre)")
    ax.set_ylabel("entropy of the model's next-token distribution (nats)")
    s = report["settings"]
    model_name = Path(str(report["model"]["dir"])).name  # the folder name: short, unlike the source
    ax.set_title(f"Entropy rate along the continuation ({model_name}, {s['prompts']} prompts)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Write plot.png (when matplotlib is installed), report.json and report.md, each atomically.
    Sets report["plot"] to the plot's file name, or None with report["plot_error"] saying why."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        png = plot_curves(report)
    except ImportError:
        report["plot"] = None
        report["plot_error"] = "matplotlib is not installed (pip install 'epic-ort[plot]')"
    else:
        write_bytes_atomic(out / "plot.png", png)
        report["plot"] = "plot.png"
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", format_markdown(report))
