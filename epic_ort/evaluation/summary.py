"""The evaluation's figures per method, from the scored passages: what report.json holds."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from ..runtime.model import CausalLM
from ..settings import AUTO, GenerationConfig
from . import diversity, metrics
from .methods import Method
from .report import json_safe
from .store import Scored

REPORT_FORMAT = "epic-ort-evaluation/2"


def _strip_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    t = list(tokens)
    while t and t[-1] in eos:
        t.pop()
    return t


def text_figures(scored: Scored, eos: set[int], length: int, buckets: int) -> dict[str, Any]:
    """Rates and curves over every position the model chose a token at (EOS included); n-gram figures
    on the text itself (a final EOS is not text; human rows have none)."""
    text = [_strip_eos(t, eos) for t in scored.tokens]
    judge = metrics.pooled_mean(scored.judge_nll) if scored.judge_nll else None
    return {
        "surprisal_rate": metrics.pooled_mean(scored.surprisals),
        "entropy_rate": metrics.entropy_rate(scored.entropies),
        "distinct_2": diversity.distinct_n(text, 2),
        "distinct_3": diversity.distinct_n(text, 3),
        "self_bleu": diversity.self_bleu(text),
        "rep_4": diversity.repeated_ngram_fraction(text, 4),
        "mean_tokens": float(np.mean([len(t) for t in scored.tokens])),
        "judge_log_loss": judge,
        "judge_perplexity": math.exp(judge) if judge is not None else None,
        "surprisal_curve": metrics.position_curve(scored.surprisals, length, buckets)["mean"],
        "entropy_curve": metrics.position_curve(scored.entropies, length, buckets)["mean"],
        "per_prompt_surprisal": metrics.per_sample_means(scored.surprisals).tolist(),
        "seconds": round(scored.seconds, 3),
    }


def method_row(name: str, spec: dict[str, Any], config: GenerationConfig, scored: Scored, human: Scored,
               eos: set[int], s: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, "config": asdict(config)}
    row.update(text_figures(scored, eos, s.max_new_tokens, s.buckets))
    row["entce"] = metrics.rate_gap(scored.surprisals, human.surprisals, n_boot=s.n_boot, seed=s.seed)
    row["entropy_gap"] = metrics.rate_gap(scored.entropies, human.entropies, n_boot=s.n_boot, seed=s.seed)
    row["alpha"] = config.alpha if config.uses_epic else None
    row["alpha_source"] = ("calibration" if spec.get("alpha") == AUTO else "fixed") if "alpha" in spec else None
    row["temperature_source"] = "calibration" if spec.get("temperature") == AUTO else None
    row["finish_reasons"] = {k: scored.finish.count(k) for k in sorted(set(scored.finish))}
    tokens = sum(len(t) for t in scored.tokens)
    row["tokens_per_second"] = round(tokens / scored.seconds, 2) if scored.seconds > 0 else None
    return row


ANCHOR = "ancestral"  # judge perplexities are compared with plain sampling's, paired by passage


def judge_ratio(method_nll: Sequence[np.ndarray], anchor_nll: Sequence[np.ndarray], n_boot: int, seed: int
                ) -> dict[str, Any]:
    """judge ppl(method) / judge ppl(anchor) with a paired bootstrap interval: the exp of the gap in
    the judge's pooled log loss. Judge perplexities of two methods differ by less than passages do,
    so a bare "95.1 vs 97.3" says nothing without it."""
    gap = metrics.rate_gap(method_nll, anchor_nll, n_boot=n_boot, seed=seed)
    exp = lambda x: math.exp(x) if x is not None else None  # noqa: E731
    return {"ratio": exp(gap["diff"]), "lo": exp(gap["diff_lo"]), "hi": exp(gap["diff_hi"])}


def _judge_against(rows: list[dict[str, Any]], results: dict[str, Scored], anchor: str, s: Any) -> None:
    base = results.get(anchor)
    if base is None or not base.judge_nll:
        return
    for row in rows:
        mine = results[row["name"]].judge_nll
        if mine and row["name"] != anchor:
            row[f"judge_vs_{anchor}"] = judge_ratio(mine, base.judge_nll, s.n_boot, s.seed)


def _against_best(rows: list[dict[str, Any]], order: list[int], results: dict[str, Scored], human: Scored,
                  s: Any) -> None:
    """Each method's |EntCE| minus the best method's, paired by passage."""
    if not order:
        return
    best = rows[order[0]]["name"]
    for i in order[1:]:
        row = rows[i]
        row["entce_vs_best"] = {"best": best, **metrics.abs_gap_difference(
            results[row["name"]].surprisals, results[best].surprisals, human.surprisals, n_boot=s.n_boot, seed=s.seed)}


def build_report(model: CausalLM, corpus: Any, positions: np.ndarray, parsed: list[Method],
                 resolved: dict[str, GenerationConfig], results: dict[str, Scored], human: Scored, s: Any,
                 judge: dict[str, str] | None) -> dict[str, Any]:
    eos = set(model.eos_token_ids)
    curve = metrics.position_curve(human.entropies, s.max_new_tokens, s.buckets)
    human_row = text_figures(human, eos, s.max_new_tokens, s.buckets)
    human_row["log_loss"] = human_row["surprisal_rate"]
    human_row["perplexity"] = math.exp(human_row["log_loss"])
    rows = [method_row(name, spec, resolved[name], results[name], human, eos, s) for name, spec in parsed]
    _judge_against(rows, results, ANCHOR, s)
    order = sorted(range(len(rows)), key=lambda i: rows[i]["entce"]["value"])
    for rank, i in enumerate(order, start=1):
        rows[i]["entce_rank"] = rank
    _against_best(rows, order, results, human, s)
    report = {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"dir": str(model.model_dir), "source": model.manifest.source,
                  "sha256": model.manifest.model_sha256, "device": getattr(model, "device", None)},
        "judge": judge,
        "corpus": {"files": corpus.describe(), "tokens": int(len(corpus.tokens))},
        "settings": {**asdict(s), "methods": [n for n, _ in parsed]},
        "buckets": {"edges": curve["edges"], "centers": curve["centers"]},
        "human": human_row,
        "methods": rows,
        "positions": [int(p) for p in positions],
    }
    return json_safe(report)
