"""EPIC's search heuristics: how big the first block is, and which rollouts stop early.

Neither changes which token is sampled: the lazy search (`lazy.py`) is exact whatever the block
sizes, and a candidate whose rollouts stopped keeps a valid bound and is taken up again in a later
round if it can still win. They change what a token costs: a first block that is too small means a
second round (k more model calls), one too large evaluates candidates in vain; rollouts that go on
for candidates that cannot win cost tree tokens. bench/epic_search.py measures them (bench/README).

Both look at what a sample's recent steps saw (`RowMemory`, kept on the row between steps), and,
for a sample's first step, at what the chooser's other samples saw (`Population`).
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


class Population:
    """Running means of the winners' Ĥ and Ĥ − h0 over all of a chooser's samples: the guess for a
    sample's first step, before it has a history of its own. Bounded: two numbers."""

    def __init__(self, weight: float = 0.9):
        self.weight = weight
        self.h: float | None = None
        self.rest: float | None = None

    def record(self, h_win: float, h0_win: float) -> None:
        w, rest = self.weight, h_win - h0_win
        self.h = h_win if self.h is None else w * self.h + (1 - w) * h_win
        self.rest = rest if self.rest is None else w * self.rest + (1 - w) * rest


@dataclass
class FirstBlockPolicy:
    """Size of a row's first block: the candidates whose bound beats (top bound − a·Ĥ_guess −
    margin), Ĥ_guess being the Ĥ this sample's recent winners had. Capped at `max_first_block`;
    later rounds take every candidate that can still win."""

    horizon: int
    max_first_block: int = 64
    margin: float = 0.5

    def predicted_need(self, memory: RowMemory, population: Population, search: LazySearch) -> int:
        h_guess = memory.h_recent
        if h_guess is None:  # first step of a sample: what other samples saw, else a middling guess
            h_guess = population.h if population.h is not None else self.horizon * 2.0
        return search.predicted_need(h_guess, self.margin)

    def size(self, memory: RowMemory, population: Population, search: LazySearch) -> int:
        return max(1, min(self.max_first_block, self.predicted_need(memory, population, search)))


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

    def keep_for_call(self, memories: Sequence[RowMemory], searches: Sequence[LazySearch], population: Population,
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
                mask[at] = self.goes_on(searches[i], memories[i], population, toks[idx[at]], lower[at], terms,
                                        expected)
            return mask

        return keep

    def goes_on(self, search: LazySearch, memory: RowMemory, population: Population, tokens: np.ndarray,
                lower: np.ndarray, terms: int, expected: bool) -> np.ndarray:
        """The rule for one row's candidates, given the sum `lower` of their first `terms` terms."""
        rest_max = (self.horizon - terms) * math.log(len(search.bound))
        upper = search.upper_bound(tokens, lower, lower + rest_max)
        target = search.best_score
        if expected:
            rest = self.expected_rest(memory, population, lower, terms, rest_max)
            reach = search.bound[tokens] - self.alpha * (lower + rest)
            target = max(target, float(reach.max()) - abs(self.alpha) * self.slack)
        return upper > target

    def expected_rest(self, memory: RowMemory, population: Population, lower: np.ndarray, terms: int,
                      rest_max: float) -> float:
        """The entropy a candidate may still add after `terms` terms: this sample's recent winners'
        Ĥ − h0 scaled to the terms left (a sample's first step: other samples' figure, else later
        depths like the ones computed)."""
        k = self.horizon
        rest = memory.rest_recent
        if rest is None:
            rest = population.rest if population.rest is not None else (k - 1) * float(np.median(lower / terms))
        return min(max(rest * (k - terms) / (k - 1), 0.0), rest_max)
