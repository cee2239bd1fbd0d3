"""The engine's rows: one sample of one request, carrying its own settings, and what a step does to
each row whatever group it decodes in (scores, logprobs, recording a token).

A row is built exactly as offline `generate` builds it (prompt ids, `sample_rng(seed, 0, s)`,
the request's processors and chooser), so the same arithmetic on it gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import numpy as np

from ..chooser import Row
from ..decoding import _Stops, _StreamState, make_chooser
from ..sampling.kernels import log_softmax
from ..sampling.processors import LogitsProcessor, ProcessorList
from ..sampling.sample import sample_rng
from ..settings import processor_settings
from .penalties import build_penalties

if TYPE_CHECKING:
    from ..runtime.model import CausalLM
    from .request import EngineRequest


@dataclass(eq=False)
class EngineRow(Row):
    """A Row plus what the engine needs to decode it among rows of other requests."""

    job: Any = None  # the request's Job (scheduler.py)
    processors: ProcessorList = field(default_factory=ProcessorList)  # the table's processors
    processors_key: Hashable = None  # rows with equal keys (and history lengths) are processed together
    penalties: LogitsProcessor | None = None  # OpenAI penalties / logit_bias, before the processors
    chooser: Any = None  # plain rows: the request's chooser (greedy, sampling, mirostat, ...)
    chooser_key: Hashable = None  # plain rows with equal keys are chosen in one call
    epic: tuple[float, ProcessorList] | None = None  # EPIC rows: their alpha and processors
    stops: _Stops | None = None
    holdback: int = 0
    stream: _StreamState = field(default_factory=_StreamState)
    last_token_at: float | None = None

    def remaining(self, max_positions: int) -> int:
        """Tokens this row may still generate (its budget, or the context's end)."""
        assert self.stops is not None
        return max(0, min(self.stops.max_new_tokens - len(self.generated),
                          max_positions - len(self.prompt_ids) - len(self.generated)))


def group_key(request: "EngineRequest") -> Hashable:
    """Rows with one key decode in one group: every plain row together, EPIC rows by (horizon,
    rollouts), the shape of EPIC's lookahead."""
    config = request.config
    return ("epic", config.horizon, config.rollouts) if config.uses_epic else "plain"


def make_rows(model: "CausalLM", request: "EngineRequest", job: Any) -> list[EngineRow]:
    """The request's n rows, as offline generate makes sample s of prompt `prompt_index`."""
    config = request.config
    processors = config.processors()
    key = (bool(config.greedy),) + tuple(getattr(config, name) for name in processor_settings())
    penalties = build_penalties(request.presence_penalty, request.frequency_penalty, request.logit_bias,
                                model.vocab_size)
    stops = _Stops(set(model.eos_token_ids), config.stop, config.max_new_tokens, model.max_positions, True)
    holdback = max((len(s) for s in config.stop), default=0)
    epic = (float(config.alpha), processors) if config.uses_epic else None  # type: ignore[arg-type]
    chooser = None if epic else make_chooser(config)
    rows = []
    for s in range(request.n):
        rng = sample_rng(config.seed, request.prompt_index, s)  # type: ignore[arg-type]
        rows.append(EngineRow(request.prompt_index, s, list(request.prompt_ids), rng, job=job,
                              processors=processors, processors_key=key, penalties=penalties, chooser=chooser,
                              chooser_key=_chooser_key(chooser), epic=epic, stops=stops, holdback=holdback))
        rows[-1].stats = {"prompt_tokens": len(request.prompt_ids)}
    return rows


def _chooser_key(chooser: Any) -> Hashable:
    """Choosers of one class with equal settings are interchangeable: one call serves their rows."""
    if chooser is None:
        return None
    state = tuple(sorted(vars(chooser).items()))
    try:
        hash(state)
    except TypeError:
        return id(chooser)
    return (type(chooser), state)


def _by_key(keys: Sequence[Hashable]) -> list[list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def score_rows(rows: Sequence[EngineRow], logits: np.ndarray) -> np.ndarray:
    """Each row's processed scores: its penalties on the raw logits, then its processors. Rows with
    the same processors and history length are processed in one call (row-wise arithmetic, so a
    row's scores are what it gets alone)."""
    raw = logits
    if any(r.penalties is not None for r in rows):
        raw = logits.copy()
        for i, r in enumerate(rows):
            if r.penalties is not None:
                raw[i] = r.penalties.apply(logits[i:i + 1], np.asarray([r.generated], dtype=np.int64))[0]
    parts = _by_key([(r.processors_key, len(r.generated)) if r.processors else None for r in rows])
    if len(parts) == 1:
        return _process(rows[0], raw, rows)
    out: np.ndarray | None = None
    for idx in parts:
        part = _process(rows[idx[0]], raw[idx], [rows[i] for i in idx])
        out = np.empty(raw.shape, dtype=part.dtype) if out is None else out
        out[idx] = part
    return out  # type: ignore[return-value]


def _process(first: EngineRow, logits: np.ndarray, rows: Sequence[EngineRow]) -> np.ndarray:
    if not first.processors:
        return logits
    history = np.array([r.generated for r in rows], dtype=np.int64).reshape(len(rows), -1)
    return first.processors.apply(logits, history)


def choose_plain(model: "CausalLM", rows: Sequence[EngineRow], logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row's token from its own chooser; rows whose choosers are alike in one call."""
    parts = _by_key([r.chooser_key for r in rows])
    if len(parts) == 1:
        return np.asarray(rows[0].chooser.choose(model, rows, logits, scores, None).tokens, dtype=np.int64)
    tokens = np.empty(len(rows), dtype=np.int64)
    for idx in parts:
        res = rows[idx[0]].chooser.choose(model, [rows[i] for i in idx], logits[idx], scores[idx], None)
        tokens[idx] = res.tokens
    return tokens


Logprobs = tuple[float, tuple[tuple[int, float], ...]]


def logprobs_of(rows: Sequence[EngineRow], logits: np.ndarray, tokens: np.ndarray) -> list[Logprobs | None]:
    """For rows whose request asks: the chosen token's log-probability and the top k, under the
    model's raw distribution (what the model said, before any processor or EPIC)."""
    out: list[Logprobs | None] = [None] * len(rows)
    want = [i for i, r in enumerate(rows) if r.job.request.logprobs is not None]
    if not want:
        return out
    lp = log_softmax(logits[want].astype(np.float32))
    for j, i in enumerate(want):
        k = rows[i].job.request.logprobs
        top = np.zeros(0, dtype=np.int64)
        if k:
            top = np.argpartition(-lp[j], min(k, lp.shape[1]) - 1)[:k]
            top = top[np.argsort(-lp[j, top], kind="stable")]
        out[i] = (float(lp[j, tokens[i]]), tuple((int(t), float(lp[j, t])) for t in top))
    return out


def record(model: "CausalLM", row: EngineRow, token: int, stats: dict[str, int] | None) -> str | None:
    """Append the chosen token (and a chooser's stats) to the row; its finish reason, if done."""
    row.generated.append(token)
    if stats:
        for k, v in stats.items():
            row.stats[k] = row.stats.get(k, 0) + v
    reason = row.stops.check(model, row, token)  # type: ignore[union-attr]
    row.finish_reason = reason
    return reason


def released_text(row: EngineRow, reason: str | None) -> str:
    """The text this token releases, with decoding's streaming holdback."""
    out: list[str] = []
    row.stream.emit(row, reason, row.holdback, lambda _r, text: out.append(text))
    return "".join(out)

