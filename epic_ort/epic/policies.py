"""EPIC's search heuristics: how big the first block is, and which rollouts stop early.

Neither changes which token is sampled: the lazy search (`lazy.py`) is exact whatever the block
sizes, and a candidate whose rollouts stopped keeps a valid bound and is taken up again in a later
round if it can still win. They change what a token costs: a first block that is too small means a
second round (k more model calls), one too large evaluates candidates in vain; rollouts that go on
for candidates that cannot win cost tree tokens. bench/epic_search.py measures them (bench/README).

Both look only at what a sample's own recent steps saw (`RowMemory`, kept on the row between steps):
what other samples saw would make a sample's calls, and so its float rounding, depend on what else
ran before it (a server's other requests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .lazy import LazySearch

Keep = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass
class RowMemory:
    """What EPIC remembers of one sample between steps (on `Row.chooser_state`)."""

    h_recent: float | None = None  # EMA of the winners' Ĥ
    rest_recent: float | None = None  # EMA of the winners' Ĥ − h0 (the rollouts' share)
    ahead: Any = None  # the next step's first depths, run ahead (run_ahead.AheadRun)

    def record(self, h_win: float, h0_win: float) -> None:
        rest = h_win - h0_win
        self.h_recent = h_win if self.h_recent is None else 0.5 * self.h_recent + 0.5 * h_win
        self.rest_recent = rest if self.rest_recent is None else 0.5 * self.rest_recent + 0.5 * rest


@dataclass
class FirstBlockPolicy:
    """Size of a row's first block: the candidates whose bound beats (top bound − a·Ĥ_guess −
    margin), Ĥ_guess being the Ĥ this sample's recent winners had. Capped at `max_first_block`;
    later rounds take every candidate that can still win."""

    horizon: int
    max_first_block: int = 64
    margin: float = 0.5

    def predicted_need(self, memory: RowMemory, search: LazySearch) -> int:
        h_guess = memory.h_recent if memory.h_recent is not None else self.horizon * 2.0  # first step: a middling guess
        return search.predicted_need(h_guess, self.margin)

    def size(self, memory: RowMemory, search: LazySearch) -> int:
        return max(1, min(self.max_first_block, self.predicted_need(memory, search)))


@dataclass
class RolloutPruner:
    """Which candidates' rollouts go on before each further depth.

    A candidate goes on if its bound, tightened by the terms of Ĥ computed so far, beats its row's
    best score found so far (else it can never win) and, in the first round (`expected`), is within
    a·slack of the best score the row is expected to reach: the best, over the call's candidates of
    the row, of bound − a·(terms so far + the sample's recent rollout entropy in the remaining
    terms). Later rounds hold candidates that may be needed, so only the first, certain test applies.
    """

    alpha: float
    horizon: int
    slack: float = 2.5

    def keep_for_call(self, memories: Sequence[RowMemory], searches: Sequence[LazySearch],
                      parents: Sequence[int], tokens: Sequence[int], expected: bool) -> Keep | None:
        """`keep` for one lookahead call whose candidate i is tokens[i] of row parents[i]."""
        if self.horizon == 1 or self.alpha == 0:
            return None
        par = np.asarray(parents)
        toks = np.asarray(tokens, dtype=np.int64)

        def keep(idx: np.ndarray, lower: np.ndarray, terms: int) -> np.ndarray:
            mask = np.ones(idx.size, dtype=bool)
            for i in np.unique(par[idx]).tolist():
                at = np.flatnonzero(par[idx] == i)
                mask[at] = self.goes_on(searches[i], memories[i], toks[idx[at]], lower[at], terms, expected)
            return mask

        return keep

    def goes_on(self, search: LazySearch, memory: RowMemory, tokens: np.ndarray,
                lower: np.ndarray, terms: int, expected: bool) -> np.ndarray:
        """The rule for one row's candidates, given the sum `lower` of their first `terms` terms."""
        rest_max = (self.horizon - terms) * math.log(len(search.bound))
        upper = search.upper_bound(tokens, lower, lower + rest_max)
        can_win = upper > search.best_score
        if not expected:
            return can_win
        rest = self.expected_rest(memory, lower, terms, rest_max)
        reach = search.bound[tokens] - search.alpha * (lower + rest)  # the row's own alpha
        go = can_win & (upper > float(reach.max()) - abs(search.alpha) * self.slack)
        # the candidate expected to be best always goes on while it can win: for a tiny alpha the
        # slack vanishes in rounding, and a row whose every candidate stopped would have no score
        # to bound the next round by
        top = int(np.argmax(reach))
        go[top] = can_win[top]
        return go

    def expected_rest(self, memory: RowMemory, lower: np.ndarray, terms: int, rest_max: float) -> float:
        """The entropy a candidate may still add after `terms` terms: this sample's recent winners'
        Ĥ − h0 scaled to the terms left (a sample's first step: later depths like the ones computed)."""
        k = self.horizon
        rest = memory.rest_recent
        if rest is None:
            rest = (k - 1) * float(np.median(lower / terms))
        return min(max(rest * (k - terms) / (k - 1), 0.0), rest_max)
