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
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..calibration.corpus import context_at, load_corpus, sample_positions
from ..decoding import Sample, generate
from ..errors import InvalidRequestError
from ..progress import progress
from ..runtime.model import CausalLM
from ..settings import AUTO, GenerationConfig
from . import metrics
from .methods import parse_methods
from .report import _json_safe, write_outputs

REPORT_FORMAT = "epic-ort-evaluation/1"




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
    corpus, positions, prompt_ids, human_ids = _passages(model, corpus_paths, prompts, prompt_tokens,
                                                         max_new_tokens, seed)
    alpha_auto = None
    if any(kw.get("alpha") == AUTO for _, kw in parsed):
        from ..calibration.store import resolve_auto_alpha

        alpha_auto = resolve_auto_alpha(model, horizon, rollouts, show_progress=show_progress)
    batches = [list(range(s, min(s + batch_size, prompts))) for s in range(0, prompts, batch_size)]
    bar = progress(total=(len(parsed) + 1) * len(batches), desc="evaluate", unit="batch", enable=show_progress)
    results: dict[str, _Scored] = {}
    configs: dict[str, dict[str, Any]] = {}
    try:
        for name, kwargs in parsed:
            configs[name] = _method_config(kwargs, alpha_auto, horizon, rollouts)
            bar.set_description(f"evaluate {name}")
            config = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, **configs[name])
            results[name] = _run_method(model, prompt_ids, config, batch_size, batches, bar)
        bar.set_description("evaluate human")
        human = _score_human(model, prompt_ids, human_ids, batches, batch_size, bar)
    finally:
        bar.close()
    eos = set(model.eos_token_ids)
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


def _passages(model: CausalLM, corpus_paths: Sequence[str | os.PathLike] | None, prompts: int, prompt_tokens: int,
              max_new_tokens: int, seed: int) -> tuple[Any, np.ndarray, list[list[int]], list[list[int]]]:
    """The corpus, the passages' positions, their prompts and their human continuations."""
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
    return corpus, positions, prompt_ids, human_ids


def _method_config(kwargs: dict[str, Any], alpha_auto: float | None, horizon: int, rollouts: int) -> dict[str, Any]:
    """A method's GenerationConfig settings, its "auto" alpha resolved and EPIC's lookahead set."""
    kwargs = dict(kwargs)
    if "alpha" in kwargs:
        if kwargs["alpha"] == AUTO:
            kwargs["alpha"] = alpha_auto
        kwargs.update(horizon=horizon, rollouts=rollouts)
    return kwargs


def _score_human(model: CausalLM, prompt_ids: list[list[int]], human_ids: list[list[int]], batches: list[list[int]],
                 batch_size: int, bar: Any) -> _Scored:
    human = _Scored(tokens=human_ids, finish=["human"] * len(human_ids))
    t0 = time.perf_counter()
    for batch in batches:
        scored = metrics.score_continuations(model, [prompt_ids[i] for i in batch], [human_ids[i] for i in batch],
                                             batch_size)
        for h, nll in scored:
            human.entropies.append(h)
            human.log_losses.append(nll)
        bar.update(1)
    human.seconds = time.perf_counter() - t0
    return human


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
