"""Token-tree calls split into runs of consecutive units, so that narrow trees are not padded to the widest.

A tree call is rectangular, [units, width]: every unit (a model row: one batch row, or a few short
ones side by side) is padded to the widest unit's tokens, and the padding costs as much as real
tokens. With long prefixes each batch row is its own unit and rows' trees differ a lot in width
(one row still explores 30 candidates while the others are down to 2), so at batch 8 most of a call
can be padding. Consecutive units are rows of the same cache buffers, so a run of them is a view:
running each run of similar width as its own call copies nothing. It pays when the padding saved
outweighs the fixed cost of another call (CALL_TOKENS), which a small dynamic program over the
units' widths decides.
"""

from __future__ import annotations

import numpy as np

from ..runtime.cache import KVCache
from ..runtime.model import CausalLM

# Rough cost model: one more call costs about as much as this many tokens through the weights (each call
# reads, or dequantizes, every weight once; a fit of call time against tokens gives 20-30 on 2 cores).
CALL_TOKENS = 24


def split_units(widths: np.ndarray, past: int, keys_per_token: float) -> list[tuple[int, int]]:
    """Runs [lo, hi) of consecutive units to call separately, the cheapest split by the cost model
    (tree.py's: attending to `keys_per_token` keys costs about one token through the weights); one
    run of all units when splitting does not pay. Units with no tokens at the ends are left out."""
    used = np.flatnonzero(widths)
    if used.size == 0:
        return []
    first, last = int(used[0]), int(used[-1]) + 1
    w = widths[first:last].astype(np.int64)
    n = w.size
    per_token = lambda width: 1.0 + (past + width) / keys_per_token  # noqa: E731
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for hi in range(1, n + 1):
        widest = 0
        for lo in range(hi - 1, -1, -1):
            widest = max(widest, int(w[lo]))
            cost = best[lo] + (CALL_TOKENS + (hi - lo) * widest * per_token(widest) if widest else 0.0)
            if cost < best[hi]:
                best[hi], cut[hi] = cost, lo
    runs, hi = [], n
    while hi > 0:
        lo = int(cut[hi])
        if w[lo:hi].max() > 0:
            runs.append((first + lo, first + hi))
        hi = lo
    return runs[::-1]


def can_split(model: CausalLM, cache: KVCache) -> bool:
    """Runs are views of the tree's buffers only where those are NumPy buffers written in place."""
    return (model.kv_in_place and cache.writes is not None and cache.room_is_free
            and all(isinstance(v, np.ndarray) for v in cache.values))


def forward_in_runs(model: CausalLM, cache: KVCache, runs: list[tuple[int, int]], ids: np.ndarray,
                    real: np.ndarray, positions: np.ndarray, tree: np.ndarray, unit: np.ndarray, col: np.ndarray
                    ) -> tuple[np.ndarray, KVCache]:
    """One tree call of [units, width] tokens as one call per run of units, each as wide as its widest
    unit. The logits come back in the order of (unit, col); the cache is the whole tree's, `width`
    columns longer, as the single call would have left it (slots no token filled are zeros: masked,
    but finite)."""
    past, width = cache.length, ids.shape[1]
    logits: np.ndarray | None = None
    filled = np.zeros(cache.rows, dtype=bool)
    for lo, hi in runs:
        filled[lo:hi] = True
        mine = np.flatnonzero((unit >= lo) & (unit < hi))
        w = int(col[mine].max()) + 1
        part = cache.row_span(lo, hi - lo, cache.attention_mask[lo:hi], cache.next_position[lo:hi])
        out, _ = model.forward(ids[lo:hi, :w], part, real[lo:hi, :w], positions=positions[lo:hi, :w],
                               tree_mask=tree[lo:hi, :w, :past + w], logits_at=(unit[mine] - lo, col[mine]),
                               scratch=True)
        if logits is None:
            logits = np.empty((unit.size, out.shape[1]), dtype=out.dtype)
        logits[mine] = out
        for v in cache.values:
            v[lo:hi, :, past + w:past + width] = 0
    if not filled.all():
        for v in cache.values:
            v[~filled, :, past:past + width] = 0
    cache.writes.end, cache.writes.scratch = past + width, True  # type: ignore[union-attr]
    tree_cache = KVCache(values=cache.values, attention_mask=np.concatenate([cache.attention_mask, real], axis=1),
                         next_position=cache.next_position + real.sum(axis=1), writes=cache.writes)
    return logits, tree_cache  # type: ignore[return-value]
