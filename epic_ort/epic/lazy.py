"""Exact lazy Gumbel-max for q_a(y) ∝ q(y)·exp(−a·H(y)).

With Gumbels g_y, the sample is argmax_y s_y, s_y = log q(y) + g_y − a·H(y). Because
0 <= H(y) <= h_max, U_y = log q(y) + g_y + max(0, −a)·h_max bounds s_y from above, so a candidate
whose bound cannot beat the best score found so far can never win and its (costly) H is never
computed. `LazySearch` is that search as a small state machine so that many rows can advance
together and share model calls; `lazy_gumbel_max` drives one row with an entropy oracle.

Partial knowledge tightens a bound without settling the score: once the depth-0 term h0 of Ĥ(y) is
known (one model row, no rollouts), h0 <= Ĥ(y) <= h0 + (k−1)·log|V|, so the bound drops by a·h0
for a > 0. The sampler uses that to skip the rollouts of candidates that cannot win.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class LazySearch:
    """One row's search. Ask `next_block()` for candidates, give back their H with `update()`,
    until `done`. Any block it returns may be evaluated at once: it never asks for a candidate
    whose bound is already beaten, and it stops only when no unevaluated bound can win, so the
    answer is the exact argmax whatever the block sizes."""

    def __init__(self, logq: np.ndarray, gumbels: np.ndarray, alpha: float, h_max: float):
        self.alpha = float(alpha)
        self.offset = max(0.0, -self.alpha) * float(h_max)
        support = np.isfinite(logq)
        self.bound = np.where(support, logq.astype(np.float64) + gumbels, -np.inf)
        self.evaluated: dict[int, float] = {}
        self.tightened: dict[int, float] = {}  # token -> its upper bound on s_y from partial knowledge
        self.best_token = -1
        self.best_score = -np.inf
        self.n_support = int(support.sum())
        self._done = self.n_support == 0

    @property
    def done(self) -> bool:
        return self._done

    def next_block(self, size: int) -> np.ndarray:
        """Up to `size` unevaluated candidates in decreasing bound order, or, with size <= 0, all
        candidates whose bound still beats the best score. Empty (and done) when none can win."""
        if self._done:
            return np.empty(0, dtype=np.int64)
        live = self.bound + self.offset > self.best_score
        for tok, upper in self.tightened.items():
            live[tok] = upper > self.best_score
        if self.evaluated:
            live[list(self.evaluated)] = False
        idx = np.flatnonzero(live)
        if idx.size == 0:
            self._done = True
            return idx.astype(np.int64)
        if 0 < size < idx.size:
            top = np.argpartition(-self.bound[idx], size - 1)[:size]
            idx = idx[top]
        return idx[np.argsort(-self.bound[idx], kind="stable")].astype(np.int64)

    def predicted_need(self, h_guess: float, margin: float = 0.5) -> int:
        """How many candidates the search will likely need if the winner's Ĥ is about `h_guess`:
        those whose bound beats (top bound − a·h_guess − margin). Sizing the first block with it
        makes a second round (k more model calls) rare without evaluating much in vain."""
        if self._done:
            return 0
        top = float(self.bound.max())
        threshold = top - self.alpha * h_guess - margin
        return int(np.count_nonzero(self.bound + self.offset > threshold))

    def upper_bound(self, tokens: np.ndarray, h_low: np.ndarray, h_high: np.ndarray) -> np.ndarray:
        """Bound on s_y for tokens whose Ĥ is known to lie in [h_low, h_high]."""
        h = h_low if self.alpha >= 0 else h_high
        return self.bound[np.asarray(tokens, dtype=np.int64)] - self.alpha * np.asarray(h, dtype=np.float64)

    def tighten(self, tokens: np.ndarray, h_low: np.ndarray, h_high: np.ndarray) -> None:
        """Record that Ĥ of each token lies in [h_low, h_high] (the token stays unevaluated)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        for tok, upper in zip(tokens.tolist(), self.upper_bound(tokens, h_low, h_high).tolist()):
            if tok not in self.evaluated:
                self.tightened[tok] = min(upper, self.tightened.get(tok, np.inf))

    def update(self, tokens: np.ndarray, entropies: np.ndarray) -> None:
        for tok, h in zip(np.asarray(tokens).tolist(), np.asarray(entropies, dtype=np.float64).tolist()):
            self.evaluated[tok] = h
            self.tightened.pop(tok, None)
            score = self.bound[tok] - self.alpha * h
            if score > self.best_score or self.best_token < 0:
                self.best_score, self.best_token = score, tok


def lazy_gumbel_max(
    logq: np.ndarray,
    gumbels: np.ndarray,
    alpha: float,
    h_max: float,
    entropy_of: Callable[[np.ndarray], np.ndarray],
    block: int = 8,
) -> tuple[int, dict[int, float]]:
    """Single-row driver: the exact Gumbel-max sample of q_a and the H values it needed."""
    search = LazySearch(logq, gumbels, alpha, h_max)
    first = True
    while not search.done:
        cands = search.next_block(block if first else 0)
        first = False
        if cands.size:
            search.update(cands, entropy_of(cands))
    return search.best_token, search.evaluated


def eager_gumbel_max(logq: np.ndarray, gumbels: np.ndarray, alpha: float, entropies: np.ndarray) -> int:
    """Reference: evaluate every token's H; what the lazy search must reproduce."""
    s = np.where(np.isfinite(logq), logq.astype(np.float64) + gumbels - alpha * entropies, -np.inf)
    return int(np.argmax(s))
