"""One group's KV cache while rows join and leave: left padded so that every row ends at the same slot.

Rows of a batch decode in lockstep, so if each row's cache ends at the same slot, one step appends
one column for all of them (`KVCache` with a shared length and a per-row attention mask; position
ids come from each row's own count). On graphs that write the cache in place the rows live in an
*arena*: cache buffers with spare rows and spare slots, of which the batch cache is a view of the
first rows. Then

- a joining row is one copy of its own prefill, right-aligned (its prompt left-padded to the batch
  length); a prompt longer than the batch moves the batch right instead (one copy, rare);
- a leaving row is filled by the last row (one row copied, not every row after it);
- padding every row has on the left (the batch's oldest rows left) is dropped when it is half the
  length, or when the arena would have to grow;
- the arena grows (one copy) only when a row needs more slots than it has, geometrically.

Untouched arena pages cost no memory, so spare rows are cheap. Other graphs (Optimum's, GPUs) get a
new exact-size cache at each join or leave: correct, but a copy of the batch each time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..runtime.cache import BufferWrites, KVCache, as_numpy, cache_buffers
from ..runtime.model import CausalLM

MIN_DROP = 64  # common padding dropped once it is at least this and half the length


class BatchCache:
    """The cache of one group's rows, in order: row i of `cache` is the group's row i."""

    def __init__(self, model: CausalLM, max_rows: int):
        self.model = model
        self.max_rows = max(1, int(max_rows))
        self.arena: list[np.ndarray] | None = None  # [rows, kv_heads, slots, head_dim] per cache tensor
        self.cache: KVCache | None = None

    @property
    def rows(self) -> int:
        return 0 if self.cache is None else self.cache.rows

    def set(self, cache: KVCache | None) -> None:
        """The cache after a step (in the arena as long as the step wrote in place)."""
        self.cache = cache if cache is not None and cache.rows else None

    def add(self, prefill: KVCache, src: Sequence[int], room: int) -> None:
        """Append rows src[0], src[1], ... of `prefill` (left-padded prompts; a row may repeat: a
        request's samples), with `room` free slots after the batch for the tokens still to come."""
        idx = np.asarray(src, dtype=np.int64)
        if not self.model.kv_in_place:
            self._add_copied(prefill, idx)
            return
        n, m, lp = self.rows, idx.size, prefill.length
        if not self._fits(n + m, max(self._length(), lp) + room) and self.cache is not None:
            self._drop_padding(1)
        length = max(self._length(), lp)
        if not self._fits(n + m, length + room):
            self._new_arena(n + m, length + room)
        if self.cache is not None and lp > self.cache.length:
            self._shift_right(lp - self.cache.length)
        for a, v in zip(self.arena, prefill.values):  # type: ignore[arg-type]
            a[n:n + m, :, :length - lp] = 0  # padding: masked, but it must hold finite numbers
            a[n:n + m, :, length - lp:length] = as_numpy(v)[idx, :, :lp]
        mask = _left_pad(prefill.attention_mask[idx], length)
        positions = prefill.next_position[idx]
        if self.cache is not None:
            mask = np.concatenate([self.cache.attention_mask, mask])
            positions = np.concatenate([self.cache.next_position, positions])
        self.cache = KVCache(values=[a[:n + m] for a in self.arena], attention_mask=mask,  # type: ignore[union-attr]
                             next_position=positions, writes=BufferWrites(length))

    def keep(self, keep: Sequence[int]) -> list[int]:
        """Only rows `keep` (ascending) go on; the others leave at once. Returns the new order (row
        i is the old row order[i]): the last rows move into the holes, one row copy each."""
        n = self.rows
        keep = [int(k) for k in keep]
        if len(keep) == n:
            return keep
        if not keep:
            self.cache = None
            return []
        k = len(keep)
        movers = [j for j in keep if j >= k]
        holes = sorted(set(range(k)) - set(keep))
        order = list(range(k))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        cache = self.cache
        if all(isinstance(v, np.ndarray) for v in cache.values) and cache.writes is not None:  # type: ignore[union-attr]
            length = cache.length  # type: ignore[union-attr]
            for v in cache.values:  # type: ignore[union-attr]
                for hole, mover in zip(holes, movers):
                    v[hole, :, :length] = v[mover, :, :length]
            self.cache = KVCache(values=[v[:k] for v in cache.values], attention_mask=cache.attention_mask[order],  # type: ignore[union-attr]
                                 next_position=cache.next_position[order], writes=cache.writes)  # type: ignore[union-attr]
        else:
            self.cache = cache.select(order)  # type: ignore[union-attr]
        self._drop_padding(max(MIN_DROP, self.cache.length // 2))
        return order

    # -- layout ---------------------------------------------------------------------------

    def _length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def _fits(self, rows: int, slots: int) -> bool:
        """The arena holds `rows` rows of `slots` slots and the cache still lives in it."""
        a = self.arena
        if a is None or a[0].shape[0] < rows or a[0].shape[2] < slots:
            return False
        if self.cache is None:
            return True
        return all(isinstance(v, np.ndarray) and v.ctypes.data == b.ctypes.data and v.strides == b.strides
                   for v, b in zip(self.cache.values, a))

    def _new_arena(self, rows: int, slots: int) -> None:
        """A bigger arena (geometric growth), the current rows copied into it."""
        spec = self.model.spec
        old = self.arena[0].shape[2] if self.arena is not None else 0
        slots = max(slots, old if old >= slots else old + old // 2, 64)
        old_rows = self.arena[0].shape[0] if self.arena is not None else 0
        shape = (max(self.max_rows, rows, old_rows), spec.num_kv_heads, slots, spec.head_dim)
        arena = cache_buffers(len(spec.past_names), shape, spec.kv_dtype)
        c = self.cache
        self.arena = arena
        if c is None:
            return
        n, length = c.rows, c.length
        for a, t in zip(arena, c.tensors()):
            a[:n, :, :length] = t
        self.cache = KVCache(values=[a[:n] for a in arena], attention_mask=c.attention_mask,
                             next_position=c.next_position, writes=BufferWrites(length))

    def _shift_right(self, d: int) -> None:
        """Move every row d slots right (a longer prompt joins): d more columns of padding."""
        c = self.cache
        length = c.length  # type: ignore[union-attr]
        for v in c.values:  # type: ignore[union-attr]
            v[:, :, d:d + length] = v[:, :, :length].copy()
            v[:, :, :d] = 0
        self.cache = KVCache(values=c.values, attention_mask=_left_pad(c.attention_mask, length + d),  # type: ignore[union-attr]
                             next_position=c.next_position, writes=BufferWrites(length + d))  # type: ignore[union-attr]

    def _drop_padding(self, at_least: int) -> None:
        """Drop the columns that are padding in every row, if there are `at_least` of them."""
        c = self.cache
        if c is None:
            return
        used = c.attention_mask.any(axis=0)
        pad = int(np.argmax(used)) if used.any() else c.length
        if pad < at_least or pad == 0:
            return
        length = c.length - pad
        if all(isinstance(v, np.ndarray) for v in c.values) and c.writes is not None:
            for v in c.values:
                v[:, :, :length] = v[:, :, pad:pad + length].copy()
            values, writes = c.values, BufferWrites(length)
        else:
            values, writes = [np.ascontiguousarray(t[:, :, pad:]) for t in c.tensors()], None
        self.cache = KVCache(values=values, attention_mask=c.attention_mask[:, pad:], next_position=c.next_position,
                             writes=writes)

    def _add_copied(self, prefill: KVCache, idx: np.ndarray) -> None:
        """Graphs that do not write in place: a new exact-size cache of all rows."""
        c, lp = self.cache, prefill.length
        length = max(c.length if c is not None else 0, lp)
        new = [np.ascontiguousarray(t[idx]) for t in prefill.tensors()]
        parts = [new] if c is None else [c.tensors(), new]
        values = [np.concatenate([_left_pad_kv(p[t], length) for p in parts]) for t in range(len(new))]
        masks = [_left_pad(prefill.attention_mask[idx], length)]
        positions = [prefill.next_position[idx]]
        if c is not None:
            masks.insert(0, _left_pad(c.attention_mask, length))
            positions.insert(0, c.next_position)
        self.cache = KVCache(values=values, attention_mask=np.concatenate(masks), next_position=np.concatenate(positions))


def _left_pad(mask: np.ndarray, length: int) -> np.ndarray:
    pad = length - mask.shape[1]
    return mask if pad == 0 else np.concatenate([np.zeros((mask.shape[0], pad), dtype=mask.dtype), mask], axis=1)


def _left_pad_kv(t: np.ndarray, length: int) -> np.ndarray:
    pad = length - t.shape[2]
    if pad == 0:
        return t
    return np.concatenate([np.zeros((*t.shape[:2], pad, t.shape[3]), dtype=t.dtype), t], axis=2)
