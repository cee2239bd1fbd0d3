"""Forked rows: EPIC's lookahead on graphs without token trees (Optimum's export, GPUs).

The prefix cache is gathered once to one model row per candidate, then tiled to R rows per
candidate for the rollouts; each depth is one call over those rows. Simple, and it works on any
graph, but the prefix is copied per candidate (the chooser caps a call's copies, `kv_budget_bytes`).
"""

from __future__ import annotations

import numpy as np

from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from .run_ahead import Given
from .calls import logits_cap


class ForkedRows:
    """The layout interface the estimator drives: `first`, `start_rollouts`, `step`, `keep`."""

    def __init__(self, model: CausalLM, horizon: int):
        self.model, self.calls, self.horizon = model, 0, horizon
        self.cache0: KVCache | None = None
        self.cache_r: KVCache | None = None
        self.ran_first = np.zeros(0, dtype=np.int64)

    def first(self, cache: KVCache, parents: np.ndarray, cands: np.ndarray, given: Given | None = None
              ) -> tuple[np.ndarray, KVCache]:
        """Depth 0: each candidate on a fork of its row's cache (`given` does not apply here)."""
        room = self.horizon if self.model.kv_in_place else 0
        logits0, self.cache0 = self.model.step(cands, cache.select(parents, room=room))  # freed on return
        self.calls += 1
        self.ran_first = np.arange(cands.size)
        return logits0, self.cache0

    def start_rollouts(self, tile: np.ndarray) -> None:
        self.cache_r = self.cache0.select(tile)  # type: ignore[union-attr]

    def step(self, tokens: np.ndarray, depth: int) -> np.ndarray:
        logits, self.cache_r = self.model.step(tokens, self.cache_r)  # type: ignore[arg-type]
        self.calls += 1
        return logits

    def keep(self, mask: np.ndarray) -> None:
        self.cache_r = self.cache_r.select(np.flatnonzero(mask))  # type: ignore[union-attr]


def forked_calls(model: CausalLM, cache: KVCache, parents: np.ndarray, horizon: int, rollouts: int,
                 kv_budget_bytes: int) -> list[np.ndarray]:
    """Split a round's candidates (indices, ascending) into calls whose forked KV cache stays within
    `kv_budget_bytes`, cut between batch rows where possible so that a row usually takes part in one
    call per depth; long prefixes mean fewer candidates per call."""
    spec = model.spec
    itemsize = np.dtype(spec.kv_dtype).itemsize
    per_row = 2 * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * itemsize * (cache.length + horizon)
    cap = max(1, int(kv_budget_bytes // (per_row * rollouts)))  # past + present, R rows per candidate
    cap = min(cap, logits_cap(model, rollouts))
    n = parents.size
    starts = [0]
    count = 0
    for j in range(1, n + 1):
        count += 1
        row_ends = j == n or parents[j] != parents[j - 1]
        if j < n and (count >= cap or (row_ends and count + _run_length(parents, j) > cap)):
            starts.append(j)
            count = 0
    return [np.arange(lo, hi) for lo, hi in zip(starts, starts[1:] + [n])]


def _run_length(parents: np.ndarray, j: int) -> int:
    """How many consecutive candidates from position j share parents[j]."""
    n = 1
    while j + n < len(parents) and parents[j + n] == parents[j]:
        n += 1
    return n
