"""A group: rows that decode through the same model calls, with one batch cache (`kvbatch.py`).

Every plain row is in one group whatever its processors or chooser (greedy, sampling, mirostat):
choosing its token needs no model call, and the step after is one call for all of them. EPIC rows
are grouped by (horizon, rollouts): one `EpicChooser` call runs all their lookaheads together, each
row with its own alpha and processors (`EpicChooser(row_params=...)`), and its chosen candidates'
depth-0 state is the next step's, so an EPIC group makes no step call of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..chooser import Row
from ..epic.chooser import EpicChooser
from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from ..sampling.processors import ProcessorList
from .kvbatch import BatchCache
from .rows import EngineRow, Logprobs, choose_plain, logprobs_of, record, score_rows


@dataclass
class Outcome:
    """What one step did to one row."""

    row: EngineRow
    token: int
    finish_reason: str | None
    logprobs: Logprobs | None


def epic_chooser(horizon: int, rollouts: int) -> EpicChooser:
    """One chooser for the EPIC rows of one (horizon, rollouts): alpha and processors per row."""
    return EpicChooser(alpha=1.0, horizon=horizon, rollouts=rollouts, processors=ProcessorList(),
                       row_params=_row_params)


def _row_params(row: Row) -> tuple[float, ProcessorList]:
    return row.epic  # type: ignore[attr-defined,return-value]


class Group:
    """Rows, their next logits and their cache, kept aligned: row i is cache row i."""

    def __init__(self, model: CausalLM, max_rows: int, chooser: EpicChooser | None = None):
        self.model = model
        self.chooser = chooser
        self.rows: list[EngineRow] = []
        self.logits: np.ndarray | None = None
        self.kv = BatchCache(model, max_rows)

    @property
    def scratch(self) -> int:
        return self.chooser.scratch_positions if self.chooser is not None else 0

    def add(self, rows: Sequence[EngineRow], logits: np.ndarray, prefill: KVCache, src: Sequence[int]) -> None:
        """Rows join at this step boundary: their prefill (rows `src` of `prefill`) is placed in the
        batch cache, their next logits beside the others'."""
        rows = list(rows)
        room = max(r.remaining(self.model.max_positions) for r in self.rows + rows) + self.scratch
        self.kv.add(prefill, src, room)
        self.rows += rows
        self.logits = logits if self.logits is None else np.concatenate([self.logits, logits])

    def remove(self, leaving: Sequence[int]) -> None:
        """Rows `leaving` leave at once; their cache rows are reused by the next to join."""
        if not leaving:
            return
        gone = set(leaving)
        self._keep([i for i in range(len(self.rows)) if i not in gone])

    def _keep(self, keep: list[int]) -> list[int]:
        order = self.kv.keep(keep)
        self.rows = [self.rows[i] for i in order]
        self.logits = self.logits[order] if order else None  # type: ignore[index]
        return order

    def step(self) -> list[Outcome]:
        """Choose every row's next token, record it, and advance the rows that go on."""
        model, rows, logits = self.model, self.rows, self.logits
        assert logits is not None and self.kv.cache is not None
        scores = score_rows(rows, logits)
        result = None
        if self.chooser is None:
            tokens = choose_plain(model, rows, logits, scores)
        else:
            result = self.chooser.choose(model, rows, logits, scores, self.kv.cache)
            tokens = np.asarray(result.tokens, dtype=np.int64)
        lps = logprobs_of(rows, logits, tokens)
        stats = result.row_stats if result is not None else None
        outcomes = [Outcome(r, int(t), record(model, r, int(t), stats[j] if stats else None), lps[j])
                    for j, (r, t) in enumerate(zip(rows, tokens.tolist()))]
        keep = [j for j, o in enumerate(outcomes) if o.finish_reason is None]
        if result is not None and result.next_cache is not None:
            self.kv.set(result.next_cache)
            self.logits = result.next_logits
            self._keep(keep)
            return outcomes
        order = self._keep(keep)
        if order:
            self.logits, cache = model.step(tokens[order], self.kv.cache)  # type: ignore[arg-type]
            self.kv.set(cache)
        return outcomes

    def reset(self) -> list[EngineRow]:
        """Drop every row (after a failed step); returns them."""
        rows, self.rows, self.logits = self.rows, [], None
        self.kv = BatchCache(self.model, self.kv.max_rows)
        return rows
