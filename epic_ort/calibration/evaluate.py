"""`epic-ort evaluate`: how close each decoding method's entropy rate comes to human text's.

N passages of real text are drawn from a corpus; each gives a prompt (the `prompt_tokens` before a
random position) and a human continuation (the `max_new_tokens` after it). Every method writes one
continuation per prompt; then the base model scores human and generated continuations alike by
teacher forcing (see `metrics.py`). Reported per method: entropy rate, calibration error
|rate - human rate| with a paired bootstrap interval over prompts, the entropy curve along the
position, distinct-2/3 and the share of repeated 4-grams; and the model's log-loss on the human
text as a reference.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..decoding import GenerationConfig, Sample, generate
from ..errors import InvalidRequestError
from ..fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..progress import progress
from ..runtime.model import CausalLM
from . import metrics
from .corpus import context_at, load_corpus, sample_positions

DEFAULT_METHODS = (
    "epic",
    "ancestral",
    "temperature=0.7",
    "top-k=50",
    "top-p=0.9",
    "top-p=0.95",
    "min-p=0.1",
    "typical-p=0.9",
)
REPORT_FORMAT = "epic-ort-evaluation/1"
AUTO = "auto"

# spec key -> (GenerationConfig field, parser)
_KEYS = {
    "temperature": ("temperature", float),
    "temp": ("temperature", float),
    "top-k": ("top_k", int),
    "top-p": ("top_p", float),
    "min-p": ("min_p", float),
    "typical-p": ("typical_p", float),
    "typical": ("typical_p", float),
    "epic": ("alpha", float),
}
_SPEC_HELP = (
    "ancestral, greedy, temperature=T, top-k=K, top-p=P, min-p=P, typical-p=P, epic (calibrated alpha) "
    "or epic=ALPHA; combine with '+', e.g. temperature=0.7+top-k=50"
)


# ---------------------------------------------------------------------------------------------
# method specs
# ---------------------------------------------------------------------------------------------


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """A method spec -> (canonical name, GenerationConfig keyword arguments).

    Accepted: `ancestral` (plain sampling, {}), `greedy`, `temperature=T`, `top-k=K`, `top-p=P`,
    `min-p=P`, `typical-p=P`, `epic` (alpha from the model's calibration: kwargs {"alpha": "auto"},
    which `evaluate` resolves) and `epic=ALPHA` (fixed alpha), and '+'-joined combinations such as
    `temperature=0.7+top-k=50` or `epic=0.2+top-p=0.95`. Case and spaces are ignored, `_` may stand
    for `-`. Anything else, or a value out of range, raises InvalidRequestError.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequestError(f"empty method spec; use one of: {_SPEC_HELP}")
    text = "".join(spec.split()).lower().replace("_", "-")
    kwargs: dict[str, Any] = {}
    names: list[str] = []
    for part in text.split("+"):
        key, eq, raw = part.partition("=")
        if key in ("ancestral", "greedy") and not eq:
            if key == "greedy":
                kwargs["greedy"] = True
            names.append(key)
            continue
        if key == "epic" and (not eq or raw == AUTO):
            if "alpha" in kwargs:
                raise InvalidRequestError(f"method {spec!r}: epic given twice")
            kwargs["alpha"] = AUTO
            names.append("epic")
            continue
        if key not in _KEYS:
            raise InvalidRequestError(f"unknown method {part!r} in {spec!r}; use {_SPEC_HELP}")
        if not eq or not raw:
            raise InvalidRequestError(f"method {spec!r}: {key} needs a value, e.g. {key}=0.9")
        field_name, kind = _KEYS[key]
        try:
            value = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise InvalidRequestError(f"method {spec!r}: {key} must be {what}, not {raw!r}") from None
        if not math.isfinite(value):
            raise InvalidRequestError(f"method {spec!r}: {key} must be a finite number")
        if field_name in kwargs:
            raise InvalidRequestError(f"method {spec!r}: {key} given twice")
        if key == "top-k" and value < 1:
            raise InvalidRequestError(f"method {spec!r}: top-k must be >= 1")
        kwargs[field_name] = value
        canonical = {"temp": "temperature", "typical": "typical-p"}.get(key, key)
        names.append(f"{canonical}={raw}")
    if kwargs.get("greedy") and len(names) > 1:
        raise InvalidRequestError(f"method {spec!r}: greedy cannot be combined with other settings")
    if "ancestral" in names and len(names) > 1:
        raise InvalidRequestError(f"method {spec!r}: ancestral means no other settings; drop it or them")
    try:
        GenerationConfig(**{k: (0.0 if v == AUTO else v) for k, v in kwargs.items()}).validate()
    except InvalidRequestError as e:
        raise InvalidRequestError(f"method {spec!r}: {e}") from None
    return "+".join(names), kwargs


def parse_methods(specs: str | Sequence[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """A comma-separated string or a list of specs (None: the defaults) -> parsed methods,
    refusing an empty list and duplicates."""
    if specs is None:
        specs = list(DEFAULT_METHODS)
    elif isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    parsed = [parse_method(s) for s in specs]
    if not parsed:
        raise InvalidRequestError(f"no methods given; use {_SPEC_HELP}")
    names = [n for n, _ in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(f"method(s) given twice: {', '.join(dupes)}")
    return parsed


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class _Scored:
    """Per-prompt results of one row of the table (a method or the human text)."""

    tokens: list[list[int]] = field(default_factory=list)
    entropies: list[np.ndarray] = field(default_factory=list)
    log_losses: list[np.ndarray] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(
    model: CausalLM,
    corpus_paths: Sequence[str | os.PathLike] | None = None,
    methods: Sequence[str] | str | None = None,
    prompts: int = 24,
    max_new_tokens: int = 128,
    prompt_tokens: int = 128,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    horizon: int = 4,
    rollouts: int = 2,
    batch_size: int = 8,
    buckets: int = 8,
    n_boot: int = 1000,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Run every method on `prompts` corpus passages, score against the human continuations,
    write report.json / report.md / plot.png into `out_dir` (created; skipped when None) and
    return the report. `methods`: specs (see `parse_method`) or a comma-separated string; None
    means DEFAULT_METHODS. `corpus_paths` None means the shipped default corpus.
    """
    started = time.perf_counter()
    for name, value, low in (("prompts", prompts, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("prompt_tokens", prompt_tokens, 1), ("batch_size", batch_size, 1),
                             ("buckets", buckets, 1), ("n_boot", n_boot, 0), ("horizon", horizon, 1),
                             ("rollouts", rollouts, 1)):
        if int(value) < low:
            raise InvalidRequestError(f"{name} must be >= {low}")
    parsed = parse_methods(methods)
    corpus = load_corpus(model, corpus_paths)
    need = len(corpus.bos) + prompt_tokens + max_new_tokens
    if need > model.max_positions:
        raise InvalidRequestError(
            f"prompt_tokens + max_new_tokens ({prompt_tokens} + {max_new_tokens}"
            f"{f' + {len(corpus.bos)} BOS' if corpus.bos else ''}) exceeds the model's context of "
            f"{model.max_positions}; lower --max-new-tokens or the prompt length"
        )
    positions = sample_positions(corpus, prompts, prompt_tokens, max_new_tokens, seed)
    prompt_ids = [context_at(corpus, int(p), prompt_tokens) for p in positions]
    human_ids = [corpus.tokens[int(p) : int(p) + max_new_tokens].tolist() for p in positions]
    eos = set(model.eos_token_ids)

    alpha_auto = None
    if any(kw.get("alpha") == AUTO for _, kw in parsed):
        from .store import resolve_auto_alpha

        alpha_auto = resolve_auto_alpha(model, horizon, rollouts, show_progress=show_progress)

    batches = [list(range(s, min(s + batch_size, prompts))) for s in range(0, prompts, batch_size)]
    bar = progress(total=(len(parsed) + 1) * len(batches), desc="evaluate", unit="batch", enable=show_progress)
    results: dict[str, _Scored] = {}
    configs: dict[str, dict[str, Any]] = {}
    try:
        for name, kwargs in parsed:
            kwargs = dict(kwargs)
            if "alpha" in kwargs:
                if kwargs["alpha"] == AUTO:
                    kwargs["alpha"] = alpha_auto
                kwargs.update(horizon=horizon, rollouts=rollouts)
            configs[name] = kwargs
            bar.set_description(f"evaluate {name}")
            config = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, **kwargs)
            results[name] = _run_method(model, prompt_ids, config, batch_size, batches, bar)
        bar.set_description("evaluate human")
        human = _Scored(tokens=human_ids, finish=["human"] * prompts)
        t0 = time.perf_counter()
        for batch in batches:
            scored = metrics.score_continuations(model, [prompt_ids[i] for i in batch],
                                                 [human_ids[i] for i in batch], batch_size)
            for h, nll in scored:
                human.entropies.append(h)
                human.log_losses.append(nll)
            bar.update(1)
        human.seconds = time.perf_counter() - t0
    finally:
        bar.close()

    report = _build_report(
        model, corpus, positions, parsed, configs, results, human, alpha_auto, eos,
        settings={
            "prompts": prompts, "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "seed": seed,
            "horizon": horizon, "rollouts": rollouts, "batch_size": batch_size, "buckets": buckets,
            "n_boot": n_boot, "methods": [n for n, _ in parsed],
        },
    )
    report["seconds"] = round(time.perf_counter() - started, 3)
    if out_dir is not None:
        write_outputs(report, out_dir)
    return report


def _run_method(model: CausalLM, prompt_ids: list[list[int]], config: GenerationConfig, batch_size: int,
                batches: list[list[int]], bar: Any) -> _Scored:
    """Generate one sample per prompt (in one `generate` call, so each prompt keeps its own random
    stream) and score each batch as soon as it is complete."""
    n = len(prompt_ids)
    samples: list[Sample | None] = [None] * n
    scored: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
    t0 = time.perf_counter()
    done = 0
    b = 0
    for sample in generate(model, prompt_ids=prompt_ids, config=config, batch_size=batch_size):
        samples[sample.prompt_index] = sample
        done += 1
        # generate decodes its batches in order and finishes one before starting the next
        while b < len(batches) and all(samples[i] is not None for i in batches[b]):
            idx = batches[b]
            for i, s in zip(idx, metrics.score_continuations(
                    model, [prompt_ids[i] for i in idx], [samples[i].token_ids for i in idx], batch_size)):
                scored[i] = s
            b += 1
            bar.update(1)
    out = _Scored(seconds=time.perf_counter() - t0)
    for s, sc in zip(samples, scored):
        assert s is not None and sc is not None
        out.tokens.append(list(s.token_ids))
        out.finish.append(s.finish_reason)
        out.entropies.append(sc[0])
        out.log_losses.append(sc[1])
    return out


def _strip_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    t = list(tokens)
    while t and t[-1] in eos:
        t.pop()
    return t


def _text_stats(scored: _Scored, eos: set[int], length: int, buckets: int) -> dict[str, Any]:
    # n-gram figures on the text itself (a final EOS is not text; the human rows have none), the
    # entropy figures on every position the model chose a token at (EOS included)
    text = [_strip_eos(t, eos) for t in scored.tokens]
    return {
        "entropy_rate": metrics.entropy_rate(scored.entropies),
        "log_loss": metrics.pooled_mean(scored.log_losses),
        "distinct_2": metrics.distinct_n(text, 2),
        "distinct_3": metrics.distinct_n(text, 3),
        "rep_4": metrics.repeated_ngram_fraction(text, 4),
        "mean_tokens": float(np.mean([len(t) for t in scored.tokens])),
        "curve": metrics.position_curve(scored.entropies, length, buckets)["mean"],
        "per_prompt_entropy": metrics.per_sample_means(scored.entropies).tolist(),
        "seconds": round(scored.seconds, 3),
    }


def _build_report(model: CausalLM, corpus: Any, positions: np.ndarray, parsed: list[tuple[str, dict[str, Any]]],
                  configs: dict[str, dict[str, Any]], results: dict[str, _Scored], human: _Scored,
                  alpha_auto: float | None, eos: set[int], settings: dict[str, Any]) -> dict[str, Any]:
    length, nb = settings["max_new_tokens"], settings["buckets"]
    curve = metrics.position_curve(human.entropies, length, nb)
    human_row = _text_stats(human, eos, length, nb)
    human_row["perplexity"] = math.exp(human_row["log_loss"])
    rows = []
    for name, spec_kwargs in parsed:
        r = results[name]
        row = {"name": name, "config": configs[name]}
        row.update(_text_stats(r, eos, length, nb))
        row["calibration_error"] = metrics.calibration_error(
            r.entropies, human.entropies, n_boot=settings["n_boot"], seed=settings["seed"])
        row["alpha"] = configs[name].get("alpha")
        row["alpha_source"] = ("calibration" if spec_kwargs.get("alpha") == AUTO else "fixed") if "alpha" in spec_kwargs else None
        row["finish_reasons"] = {k: r.finish.count(k) for k in sorted(set(r.finish))}
        row["tokens_per_second"] = round(sum(len(t) for t in r.tokens) / r.seconds, 2) if r.seconds > 0 else None
        rows.append(row)
    report = {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"dir": str(model.model_dir), "source": model.manifest.source,
                  "sha256": model.manifest.model_sha256, "device": getattr(model, "device", None)},
        "corpus": {"files": corpus.describe(), "tokens": int(len(corpus.tokens))},
        "settings": settings,
        "epic_alpha": alpha_auto,
        "buckets": {"edges": curve["edges"], "centers": curve["centers"]},
        "human": human_row,
        "methods": rows,
        "positions": [int(p) for p in positions],
    }
    return _json_safe(report)


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


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


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
