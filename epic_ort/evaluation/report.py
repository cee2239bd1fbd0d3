"""The evaluation's report: a markdown table, report.md, plot.png and report.json."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_bytes_atomic, write_json_atomic, write_text_atomic


def json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); NumPy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _fmt(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _label(row: dict[str, Any]) -> str:
    name = row["name"]
    if row.get("alpha_source") == "calibration" and row.get("alpha") is not None:
        name += f" (alpha={row['alpha']:.3g})"
    if row.get("temperature_source") == "calibration":
        name += f" (T={row['config']['temperature']:.3g})"
    return name


def _gap(g: dict[str, Any]) -> str:
    ci = f" [{_fmt(g['diff_lo'], signed=True)}, {_fmt(g['diff_hi'], signed=True)}]" if g.get("diff_lo") is not None else ""
    return _fmt(g["diff"], signed=True) + ci


TABLE_HEAD = ["method", "EntCE [95% CI]", "|EntCE|", "|EntCE| − best's [95% CI]", "surprisal rate",
              "entropy gap [95% CI]", "distinct-2", "distinct-3", "self-BLEU", "rep-4", "mean tokens", "judge ppl",
              "judge ppl ÷ ancestral [95% CI]"]


def _vs_best(row: dict[str, Any]) -> str:
    r = row.get("entce_vs_best")
    if not r:
        return "best"
    ci = f" [{_fmt(r['lo'], signed=True)}, {_fmt(r['hi'], signed=True)}]" if r.get("lo") is not None else ""
    return _fmt(r["diff"], signed=True) + ci


def _judge_ratio(row: dict[str, Any]) -> str:
    r = row.get("judge_vs_ancestral")
    if not r:
        return "–"
    ci = f" [{_fmt(r['lo'])}, {_fmt(r['hi'])}]" if r.get("lo") is not None else ""
    return _fmt(r["ratio"]) + ci


def format_table(report: dict[str, Any]) -> str:
    """One row per method (best |EntCE| first), then the human text, then what the rates are against."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEAD) - 1)) + "|"]
    for row in sorted(report["methods"], key=lambda r: r.get("entce_rank", 0)):
        cells = [_label(row), _gap(row["entce"]), _fmt(row["entce"]["value"]), _vs_best(row),
                 _fmt(row["surprisal_rate"]), _gap(row["entropy_gap"]), _fmt(row["distinct_2"]), _fmt(row["distinct_3"]), _fmt(row["self_bleu"]),
                 _fmt(row["rep_4"]), _fmt(row["mean_tokens"], 1), _fmt(row.get("judge_perplexity"), 2),
                 _judge_ratio(row)]
        lines.append("| " + " | ".join(cells) + " |")
    h = report["human"]
    cells = ["**human**", "0", "–", "–", _fmt(h["log_loss"]), "0", _fmt(h["distinct_2"]), _fmt(h["distinct_3"]),
             _fmt(h["self_bleu"]), _fmt(h["rep_4"]), _fmt(h["mean_tokens"], 1), _fmt(h.get("judge_perplexity"), 2), "–"]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Base model on the human continuations: log loss {_fmt(h['log_loss'])} nats/token (perplexity "
                 f"{_fmt(h.get('perplexity'), 2)}), entropy rate {_fmt(h['entropy_rate'])} nats/token.")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """report.md: the table, what the columns mean, the settings, the plot."""
    s = report["settings"]
    corpus = ", ".join(f"{Path(f['path']).name} (sha256 {f['sha256'][:12]})" for f in report["corpus"]["files"])
    judge = report.get("judge")
    parts = [
        "# epic-ort evaluate", "", format_table(report), "",
        "EntCE (entropy-calibration error, Braverman et al. 2020; Cao, Valiant & Liang 2025): the mean surprisal "
        "−log q of each method's own tokens under the base model minus the base model's log loss on the human "
        "continuations of the same passages (nats/token; 0 is calibrated, > 0 the generations surprise the model "
        "more than human text does). Entropy gap: mean entropy of q along the generation minus along the human "
        f"text. Both with {_level(report)}% paired bootstrap intervals over "
        "passages. |EntCE| − best's: how much farther from calibrated than the first row, the passages resampled "
        "together for both methods (an interval holding 0: the two cannot be told apart). Every interval: "
        f"{s['n_boot']} resamples of the passages. distinct-n: unique / total n-grams over all samples. self-BLEU: "
        "BLEU-4 of each sample against the others (lower: more varied across samples). rep-4: share of 4-grams "
        "already seen earlier in the same sample. Judge ppl: perplexity of the continuation text under the judge "
        "model" + (f" ({judge['dir']})" if judge else " (none given: --judge MODEL_DIR)") + "; ÷ ancestral: "
        "its ratio to plain sampling's judge perplexity on the same passages, with a paired bootstrap interval "
        "(below 1: the judge finds the text more predictable than plain sampling's).",
        "", "## Settings", "",
        f"- model: {report['model']['dir']} (sha256 {str(report['model']['sha256'])[:12]})",
        f"- corpus: {corpus}; {report['corpus']['tokens']} tokens",
        f"- passages: {s['prompts']} of {s['prompt_tokens']} prompt tokens; {s['max_new_tokens']} new tokens; "
        f"seed {s['seed']}; EPIC horizon {s['horizon']}, rollouts {s['rollouts']}",
        f"- created {report['created']}; {report.get('seconds', 0):.1f} s", "",
    ]
    if report.get("plot"):
        parts += [f"![EntCE and the rates along the position]({report['plot']})", ""]
    return "\n".join(parts)


def _level(report: dict[str, Any]) -> int:
    rows = report["methods"]
    return int(round(100 * rows[0]["entce"].get("level", 0.95))) if rows else 95


def plot_report(report: dict[str, Any]) -> bytes:
    """plot.png: EntCE with its interval per method, and surprisal and entropy along the position
    (human in black). matplotlib's Agg canvas directly: no display, no change to a caller's pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    rows = sorted(report["methods"], key=lambda r: r.get("entce_rank", 0))
    _plot_entce(axes[0], rows)
    x = report["buckets"]["centers"]
    for ax, key, what in ((axes[1], "surprisal_curve", "surprisal −log q (nats)"),
                          (axes[2], "entropy_curve", "entropy of q (nats)")):
        for row in rows:
            ax.plot(x, _ys(row[key]), marker="o", markersize=3, linewidth=1.2, label=_label(row))
        ax.plot(x, _ys(report["human"][key]), color="black", linewidth=3.0, marker="o", markersize=4, label="human")
        ax.set_xlabel("position in the continuation (tokens, bucket centre)")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize=7, loc="best")
    s = report["settings"]
    fig.suptitle(f"{Path(str(report['model']['dir'])).name}: {s['prompts']} passages x {s['max_new_tokens']} tokens",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _ys(values: list[Any]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def _plot_entce(ax: Any, rows: list[dict[str, Any]]) -> None:
    ys = np.arange(len(rows))[::-1]
    for y, row in zip(ys, rows):
        g = row["entce"]
        ax.plot([g["diff"]], [y], "o", color="tab:red" if row.get("alpha") is not None else "tab:blue")
        if g.get("diff_lo") is not None:
            ax.plot([g["diff_lo"], g["diff_hi"]], [y, y], color="gray", linewidth=2)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(ys, [_label(r) for r in rows], fontsize=7)
    ax.set_xlabel("EntCE (nats/token), 95% CI")
    ax.grid(True, axis="x", alpha=0.3)


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """plot.png (when matplotlib is installed), report.json and report.md, each atomically.
    Sets report["plot"] to the plot's file name, or None with report["plot_error"] saying why."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        png = plot_report(report)
    except ImportError:
        report["plot"] = None
        report["plot_error"] = "matplotlib is not installed (pip install 'epic-ort[plot]')"
    else:
        write_bytes_atomic(out / "plot.png", png)
        report["plot"] = "plot.png"
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", format_markdown(report))
