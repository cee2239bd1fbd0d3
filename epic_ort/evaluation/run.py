"""`epic-ort evaluate`: how close each decoding method comes to human text, by the field's measures.

N passages of real text are drawn from a corpus; each gives a prompt (the `prompt_tokens` before a
random position) and a human continuation (the `max_new_tokens` after it). Every method writes one
continuation per passage; the base model then scores human and generated continuations alike by
teacher forcing (metrics.py), and a judge model, when given, scores their text (judge.py). The table
(summary.py) leads with the entropy-calibration error.

Generations and scores are written under `out_dir` as they finish (store.py): an interrupted run
resumes where it stopped and a rerun reuses what is done. Each passage keeps its own random stream
(its index seeds it), so a resumed run generates what the uninterrupted one would have.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..calibration.corpus import Corpus, context_at, load_corpus, nested_positions
from ..decoding import generate
from ..errors import InvalidRequestError
from ..progress import progress
from ..runtime.model import CausalLM
from ..settings import AUTO, GenerationConfig
from ..scoring import score_continuations
from .judge import Judge
from .methods import Method, parse_methods
from .report import write_outputs
from .store import MethodStore, Record, Scored, rounded
from .summary import build_report


@dataclass(frozen=True)
class EvaluationSettings:
    prompts: int = 96
    max_new_tokens: int = 256
    prompt_tokens: int = 128
    seed: int = 0
    horizon: int = 4
    rollouts: int = 2
    batch_size: int = 8
    buckets: int = 8
    n_boot: int = 2000

    def validate(self) -> None:
        for name, value in asdict(self).items():
            low = 0 if name in ("n_boot", "seed") else 1
            if not isinstance(value, int) or value < low:
                raise InvalidRequestError(f"{name} must be an integer >= {low}")


@dataclass
class _Passages:
    corpus: Corpus
    positions: np.ndarray
    prompts: list[list[int]]
    human: list[list[int]]


def evaluate(model: CausalLM, corpus_paths: Sequence[str | os.PathLike] | None = None,
             methods: Sequence[str] | str | None = None, *, out_dir: str | os.PathLike | None = None,
             judge: CausalLM | None = None, judge_methods: Sequence[str] | None = None,
             show_progress: bool | None = None, **settings: Any) -> dict[str, Any]:
    """Run every method on the corpus passages, score them against the human continuations, write
    report.json / report.md / plot.png (and the generations) under `out_dir`, return the report.
    `methods`: specs (see methods.parse_method) or a comma-separated string; None: the defaults.
    `judge_methods`: the methods the judge scores (with the human text; None: all of them): a judge
    with a large vocabulary costs more per row than generating it.
    `settings`: EvaluationSettings' fields (prompts, max_new_tokens, ...)."""
    started = time.perf_counter()
    s = EvaluationSettings(**settings)
    s.validate()
    parsed = parse_methods(methods)
    judged = _judged_names(parsed, judge_methods) if judge is not None else set()
    passages = _passages(model, corpus_paths, s)
    resolved = _resolve_auto(model, parsed, s, show_progress)
    judge_ = Judge(judge, s.batch_size) if judge is not None else None
    # passage i lies where the seed's fixed order puts it, whatever the count: more passages reuse these
    base_key = {"model": model.manifest.model_sha256, "corpus": [f["sha256"] for f in passages.corpus.describe()],
                "passages": {"order": "permutation", "seed": s.seed}, "prompt_tokens": s.prompt_tokens,
                "max_new_tokens": s.max_new_tokens}
    stores = {"human": MethodStore(out_dir, "human", base_key)}
    stores.update({name: MethodStore(out_dir, name, {**base_key, "config": asdict(resolved[name]), "seed": s.seed})
                   for name, _ in parsed})
    stages = len(stores) + (1 + len(judged) if judge_ else 0)  # human, the methods, and those judged again
    bar = _StageBars(stages, s.prompts * s.max_new_tokens, show_progress)
    results: dict[str, Scored] = {}
    with bar.stage("score human") as b:
        human = _human(model, passages, stores["human"], s, b)
    for name, _ in parsed:
        with bar.stage(f"generate {name}") as b:
            results[name] = _method(model, passages, resolved[name], stores[name], s, b)
    if judge_ is not None:
        for name, scored in [("human", human), *[(n, r) for n, r in results.items() if n in judged]]:
            with bar.stage(f"judge {name}") as b:
                store = stores[name].judge_store(out_dir, judge_.identity)
                scored.judge_nll = _judged(model, passages, scored, judge_, store, s, b)
    report = build_report(model, passages.corpus, passages.positions, parsed, resolved, results, human, s,
                          judge_.identity if judge_ else None)
    report["seconds"] = round(time.perf_counter() - started, 3)
    if out_dir is not None:
        write_outputs(report, out_dir)
    return report


class _StageBars:
    """One bar per stage (scoring, each method, each judging), so that each rate and ETA is that
    stage's own: EPIC generates tokens a hundred times slower than the base model scores them."""

    def __init__(self, stages: int, total: int, enable: bool | None):
        self.stages, self.total, self.enable, self.done = stages, total, enable, 0

    def stage(self, name: str) -> Any:
        self.done += 1
        return progress(total=self.total, desc=f"evaluate [{self.done}/{self.stages}] {name}", unit="tok",
                        enable=self.enable)


def _judged_names(parsed: list[Method], judge_methods: Sequence[str] | None) -> set[str]:
    names = [n for n, _ in parsed]
    if judge_methods is None:
        return set(names)
    wanted = [m.strip() for m in judge_methods if m.strip()]
    unknown = [m for m in wanted if m not in names]
    if unknown:
        raise InvalidRequestError(f"judge methods {', '.join(unknown)} are not among the evaluated methods "
                                  f"({', '.join(names)})")
    return set(wanted)


def _passages(model: CausalLM, corpus_paths: Sequence[str | os.PathLike] | None, s: EvaluationSettings) -> _Passages:
    corpus = load_corpus(model, corpus_paths)
    need = len(corpus.bos) + s.prompt_tokens + s.max_new_tokens
    if need > model.max_positions:
        raise InvalidRequestError(
            f"prompt_tokens + max_new_tokens ({s.prompt_tokens} + {s.max_new_tokens}"
            f"{f' + {len(corpus.bos)} BOS' if corpus.bos else ''}) exceeds the model's context of "
            f"{model.max_positions}; lower --max-new-tokens or the prompt length"
        )
    positions = nested_positions(corpus, s.prompts, s.prompt_tokens, s.max_new_tokens, s.seed)
    prompts = [context_at(corpus, int(p), s.prompt_tokens) for p in positions]
    human = [corpus.tokens[int(p): int(p) + s.max_new_tokens].tolist() for p in positions]
    return _Passages(corpus, positions, prompts, human)


def _resolve_auto(model: CausalLM, parsed: list[Method], s: EvaluationSettings, show_progress: bool | None
                  ) -> dict[str, GenerationConfig]:
    """Each method's full GenerationConfig: "auto" alpha and temperature from the model's calibration,
    EPIC's lookahead from the settings."""
    from ..calibration.store import resolve_auto_alpha, resolve_auto_temperature

    out = {}
    for name, kwargs in parsed:
        kw = dict(kwargs)
        if "alpha" in kw:
            kw.update(horizon=s.horizon, rollouts=s.rollouts)
            if kw["alpha"] == AUTO:
                kw["alpha"] = resolve_auto_alpha(model, s.horizon, s.rollouts, show_progress=show_progress)
        if kw.get("temperature") == AUTO:
            kw["temperature"] = resolve_auto_temperature(model, s.horizon, s.rollouts, show_progress=show_progress)
        out[name] = GenerationConfig(max_new_tokens=s.max_new_tokens, seed=s.seed, **kw)
    return out


def _human(model: CausalLM, p: _Passages, store: MethodStore, s: EvaluationSettings, bar: Any) -> Scored:
    done = store.load()
    bar.update(len(done) * s.max_new_tokens)
    missing = [i for i in range(s.prompts) if i not in done]
    try:
        for start in range(0, len(missing), s.batch_size):
            idx = missing[start:start + s.batch_size]
            for rec in _score(model, p, idx, [p.human[i] for i in idx], ["human"] * len(idx), s, 0.0):
                done[rec.index] = rec
                store.append(rec)
            bar.update(len(idx) * s.max_new_tokens)
    finally:
        store.close()
    return _scored(done, s.prompts)


def _method(model: CausalLM, p: _Passages, config: GenerationConfig, store: MethodStore, s: EvaluationSettings,
            bar: Any) -> Scored:
    """Generate the passages still missing, scoring (and storing) each batch as it completes."""
    done = store.load()
    bar.update(len(done) * s.max_new_tokens)
    missing = [i for i in range(s.prompts) if i not in done]
    pending: list[Any] = []
    t0 = time.perf_counter()

    def flush() -> None:
        idx = [x.prompt_index for x in pending]
        seconds = (time.perf_counter() - t0) / max(len(pending), 1)
        for rec in _score(model, p, idx, [x.token_ids for x in pending], [x.finish_reason for x in pending], s,
                          seconds):
            done[rec.index] = rec
            store.append(rec)
        # the tokens a sample did not take (it ended early) count as done
        bar.update(sum(s.max_new_tokens - len(x.token_ids) for x in pending))
        pending.clear()

    try:
        for sample in generate(model, prompt_ids=[p.prompts[i] for i in missing], prompt_indices=missing,
                               config=config, batch_size=s.batch_size, on_step=bar.update):
            pending.append(sample)
            if len(pending) >= s.batch_size:
                flush()
                t0 = time.perf_counter()
        if pending:
            flush()
    finally:
        store.close()
    return _scored(done, s.prompts)


def _score(model: CausalLM, p: _Passages, idx: list[int], tokens: list[list[int]], finish: list[str],
           s: EvaluationSettings, seconds: float) -> list[Record]:
    """Base-model surprisals and entropies along each continuation."""
    scored = score_continuations(model, [p.prompts[i] for i in idx], tokens, s.batch_size)
    # rounded as they are stored, so that a report reads the same from fresh scores and from stored ones
    return [Record(i, list(map(int, toks)), f, np.round(nll, 6), np.round(h, 6), seconds)
            for i, toks, f, (h, nll) in zip(idx, tokens, finish, scored)]


def _judged(model: CausalLM, p: _Passages, scored: Scored, judge: Judge, store: Any, s: EvaluationSettings,
            bar: Any) -> list[np.ndarray]:
    """The judge's log loss on each passage's continuation text (cached like the generations)."""
    done = {i: np.asarray(obj["nll"], dtype=np.float64) for i, obj in store.load().items()}
    bar.update(len(done) * s.max_new_tokens)
    missing = [i for i in range(s.prompts) if i not in done]
    eos = set(model.eos_token_ids)
    try:
        for start in range(0, len(missing), s.batch_size):
            idx = missing[start:start + s.batch_size]
            texts = [model.decode([t for t in scored.tokens[i] if t not in eos]) for i in idx]
            for i, nll in zip(idx, judge.log_losses([model.decode(p.prompts[i]) for i in idx], texts)):
                done[i] = np.round(nll, 6)
                store.append({"index": i, "nll": rounded(nll)})
            bar.update(len(idx) * s.max_new_tokens)
    finally:
        store.close()
    return [done[i] for i in range(s.prompts)]


def _scored(done: dict[int, Record], count: int) -> Scored:
    out = Scored()
    for i in range(count):
        r = done[i]
        out.tokens.append(r.tokens)
        out.finish.append(r.finish)
        out.surprisals.append(r.surprisals)
        out.entropies.append(r.entropies)
        out.seconds += r.seconds
    return out

