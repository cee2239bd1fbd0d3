"""The benchmark's table, ratios and plot, from the workers' results."""

from __future__ import annotations

import io
from typing import Any

from workers import EPIC

NOISY = 1.25  # slowest / fastest timed run above this: the tokens/s cell gets a '*'
ANCHORS = (("transformers", "ratio_vs_transformers"), ("optimum", "ratio_vs_optimum"), ("llama.cpp", "ratio_vs_llama_cpp"))


def add_ratios(results: list[dict[str, Any]]) -> None:
    base = {}
    for r in results:
        if r.get("mode") == "plain" and "tokens_per_s" in r:
            base[(r["engine"], r["batch"], r["prompt_len"])] = r["tokens_per_s"]
    for r in results:
        if "tokens_per_s" not in r:
            continue
        key = (r["batch"], r["prompt_len"])
        for engine, name in ANCHORS:
            b = base.get((engine,) + key)
            r[name] = r["tokens_per_s"] / b if b else None


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _mp(r: dict[str, Any], name: str) -> str:
    """'mean / p95' per token (per-step figures), or the per-token mean alone."""
    if f"{name}_per_step_mean" in r:
        return f"{r[f'{name}_per_token']:.2f} / {r[f'{name}_per_step_p95']:.0f}"
    if f"{name}_per_token" in r:
        return _f(r[f"{name}_per_token"])
    return "–"


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "engine", "mode", "batch", "prompt tokens", "gen. tokens", "tokens/s", "× transformers", "× Optimum", "× llama.cpp",
        "EPIC time/token ÷ plain", "forward passes/token", "evals/token", "lookahead tokens/token", "peak RSS MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if "error" in r:
            cells = [r.get("engine", "?"), r.get("mode", "?"), str(r.get("batch", "?")), str(r.get("prompt_len", "?")),
                     "FAILED: " + r["error"][:120].replace("|", "/")] + ["–"] * (len(head) - 6) + [_f(r.get("peak_rss_mb"), "{:.0f}")]
        else:
            gen = f"{r['generated_tokens']}/{r['batch'] * r['tokens']}"
            times = r.get("seconds_all") or []
            noisy = len(times) > 1 and max(times) > NOISY * min(times)
            cells = [
                r["engine"], r["mode"], str(r["batch"]), str(r["prompt_len"]), gen, _f(r["tokens_per_s"], "{:.1f}") + (" *" if noisy else ""),
                _f(r.get("ratio_vs_transformers")), _f(r.get("ratio_vs_optimum")), _f(r.get("ratio_vs_llama_cpp")),
                _f(r.get("epic_time_per_token_over_plain")),
                _mp(r, "forward_passes"), _mp(r, "evals") if r["mode"] == "epic" else "–",
                _mp(r, "lookahead_tokens") if r["mode"] == "epic" else "–",
                _f(r.get("peak_rss_mb"), "{:.0f}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """\
Columns: `× transformers` / `× Optimum` / `× llama.cpp` = this row's tokens/s ÷ plain tokens/s of that engine at the same batch and
prompt length. `EPIC time/token ÷ plain` = EPIC seconds per token ÷ epic-ort plain seconds per token, both timed in the
same worker process (same session, same prompt, same token budget). `forward passes/token`: ORT calls a row takes part
in per token (calls are shared by all rows of a batch); `evals/token`: candidate lookahead entropies evaluated;
`lookahead tokens/token`: candidate and rollout tokens run in lookahead calls; EPIC cells are `mean / p95`, the mean per generated token and the
95th percentile over (row, step) pairs. `*` after tokens/s: the slowest timed run took over 1.25x the fastest (a
busy machine; the median is shown, all times are in results.json). `peak RSS MB`: ru_maxrss of the worker (loading included; the EPIC worker also
ran plain sampling, whose peak is lower)."""


def plot_results(results: list[dict[str, Any]]) -> bytes:
    """results.png: left, plain tokens/s of each engine per (batch, prompt length), epic-ort's bars
    marked with its ratios; right, EPIC's time per token ÷ plain, beside the 2.5·k target. Uses
    matplotlib's Agg canvas (no pyplot, no display); ImportError when matplotlib is missing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in results if "error" not in r]
    configs = sorted({(r["batch"], r["prompt_len"]) for r in ok}, key=lambda c: (c[1], c[0]))
    names = [f"batch {b}\nprompt {p}" for b, p in configs]
    engines = [e for e in ("epic-ort", "transformers", "optimum", "llama.cpp") if any(r["engine"] == e for r in ok)]

    def plain(engine: str, config: tuple[int, int]) -> dict[str, Any] | None:
        return next((r for r in ok if r["engine"] == engine and r["mode"] == "plain"
                     and (r["batch"], r["prompt_len"]) == config), None)

    fig = Figure(figsize=(11, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    width = 0.8 / max(len(engines), 1)
    for j, engine in enumerate(engines):
        xs = [i + (j - (len(engines) - 1) / 2) * width for i in range(len(configs))]
        rows = [plain(engine, c) for c in configs]
        ax.bar(xs, [r["tokens_per_s"] if r else 0.0 for r in rows], width, label=engine)
        if engine == "epic-ort":
            for x, r in zip(xs, rows):
                if r and r.get("ratio_vs_transformers") is not None:
                    text = f"{r['ratio_vs_transformers']:.2f}x T"
                    if r.get("ratio_vs_optimum") is not None:
                        text += f"\n{r['ratio_vs_optimum']:.2f}x O"
                    if r.get("ratio_vs_llama_cpp") is not None:
                        text += f"\n{r['ratio_vs_llama_cpp']:.2f}x L"
                    ax.annotate(text, (x, r["tokens_per_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(configs)), names, fontsize=8)
    ax.set_ylim(0, max([r["tokens_per_s"] for r in ok if r["mode"] == "plain"] + [1.0]) * 1.18)
    ax.set_ylabel("plain sampling, tokens/s (all rows)")
    ax.set_title("Plain sampling (T = transformers, O = Optimum, L = llama.cpp)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    epic = [next((r for r in ok if r["engine"] == "epic-ort" and r["mode"] == "epic"
                  and (r["batch"], r["prompt_len"]) == c), None) for c in configs]
    values = [r["epic_time_per_token_over_plain"] if r else 0.0 for r in epic]
    bars = bx.bar(range(len(configs)), values, 0.6, color="tab:purple")
    for bar, r in zip(bars, epic):
        if r:
            bx.annotate(f"{r['epic_time_per_token_over_plain']:.2f}x\n{r['forward_passes_per_token']:.2f} passes",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    target = 2.5 * EPIC["horizon"]
    bx.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target 2.5·k = {target:g}x (batch 1, prompt 32)")
    bx.legend(fontsize=8, loc="upper left")
    bx.set_ylim(0, max(values + [target]) * 1.25)
    bx.set_xticks(range(len(configs)), names, fontsize=8)
    bx.set_ylabel("EPIC time per token ÷ epic-ort plain")
    bx.set_title(f"EPIC (alpha {EPIC['alpha']}, k {EPIC['horizon']}, R {EPIC['rollouts']})", fontsize=10)
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
