"""The KV cache protocol: buffers with room, forks, compaction, growth, and token-tree scratch.

Everything that reads or writes cache tensors lives here. On graphs that write the cache in place
(the lean graph on the CPU) a cache is one set of NumPy buffers with room after its length: a step
binds its present outputs to them and the attention appends there, so nothing is copied. A cache's
own slots are never written; continuing a cache a second time forks it (one gather per tensor), so
no continuation is overwritten. The room past a cache may instead hold *scratch*: EPIC's token
trees, which are written there, read back as columns, and dropped or kept as one appended token.
A cache of OrtValues on a device (graphs that cannot write in place) is forked and extended there,
by device_kv.py, never through the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .device_kv import DeviceKV, is_device_tensor

@dataclass
class BufferWrites:
    """How far a set of cache buffers has been written, shared by all caches on those buffers,
    and whether what lies past a cache's length is scratch (EPIC's token trees) or a real
    continuation of it."""

    end: int
    scratch: bool = False


@dataclass
class KVCache:
    """Past keys/values of a batch of rows, all padded on the left to the same length.

    `attention_mask` [rows, length] marks real tokens; `next_position` [rows] is the position id
    the next token of each row gets. `values` are [rows, kv_heads, capacity, head_dim] with
    capacity >= length: on graphs that write the cache in place (`CausalLM.kv_in_place`) the slots
    after `length` are room for the next tokens, so appending copies nothing. A cache's own slots
    are never written. Continuing a cache a second time (a fork: its room already holds another
    continuation) copies it first, so no continuation is overwritten; scratch may be.
    """

    values: list[Any]  # OrtValues (or NumPy arrays) [rows, kv_heads, capacity, head_dim]
    attention_mask: np.ndarray
    next_position: np.ndarray
    writes: BufferWrites | None = None  # NumPy buffers with room (in-place graphs) only
    bound: "_BoundBuffers | None" = field(default=None, repr=False, compare=False)
    device_ops: DeviceKV | None = field(default=None, repr=False, compare=False)  # for OrtValue tensors

    @property
    def on_device(self) -> bool:
        """The tensors are OrtValues that the model's provider forks where they live."""
        return self.device_ops is not None and is_device_tensor(self.values[0])

    def _like(self, values: list[Any], rows: np.ndarray | slice) -> "KVCache":
        """A device cache of `values`, with this one's mask and positions at `rows`."""
        return KVCache(values=values, attention_mask=self.attention_mask[rows], next_position=self.next_position[rows],
                       device_ops=self.device_ops)

    @property
    def room_is_free(self) -> bool:
        """Nothing continues this cache in its room yet (true too of tensors that have no room of
        ours: appending to them copies anyway), so appending need not fork it."""
        w = self.writes
        return w is None or w.end <= self.length or w.scratch

    @property
    def rows(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    @property
    def capacity(self) -> int:
        v = self.values[0]
        return int(v.shape[2] if isinstance(v, np.ndarray) else v.shape()[2])

    def tensors(self) -> list[np.ndarray]:
        """The filled part of each cache tensor, [rows, kv_heads, length, head_dim] (views on the CPU)."""
        return [as_numpy(v)[:, :, : self.length] for v in self.values]

    def select(self, rows: Sequence[int] | np.ndarray, room: int | None = None) -> "KVCache":
        """Gather (and repeat) rows into new tensors: one gather per tensor, whatever the number
        of rows. The copy keeps the room this cache has, or gets `room` free slots. Used for the
        fork that tiles a prefix to many lookahead rows, and to share one prefill among samples."""
        idx = np.asarray(rows, dtype=np.int64)
        if self.on_device:  # no room: a device cache is never written in place
            same = idx.size == self.rows and np.array_equal(idx, np.arange(self.rows))
            return self._like(list(self.values) if same else self.device_ops.select(self.values, idx), idx)
        capacity = self.capacity if room is None else self.length + room
        if capacity == self.length == self.capacity:
            values, writes = [_take_rows(v, idx) for v in self.values], None
        else:
            values, writes = _gather_slots(self.values, idx, self.length, capacity), BufferWrites(self.length)
        return KVCache(values=values, attention_mask=self.attention_mask[idx], next_position=self.next_position[idx],
                       writes=writes)

    def compacted(self, rows: Sequence[int] | np.ndarray) -> "KVCache":
        """Rows `rows` (ascending), moved to the front of this cache's own buffers: how the decoding
        loop drops finished rows without a second copy of the cache. This cache is used up."""
        idx = np.asarray(rows, dtype=np.int64)
        if not all(isinstance(v, np.ndarray) for v in self.values) or (idx.size and np.any(np.diff(idx) <= 0)):
            return self.select(idx)
        n = self.length
        for v in self.values:
            for dst, src in enumerate(idx.tolist()):
                if dst != src:
                    v[dst, :, :n] = v[src, :, :n]
        return KVCache(values=[v[: idx.size] for v in self.values], attention_mask=self.attention_mask[idx],
                       next_position=self.next_position[idx], writes=self.writes)

    def reserve(self, extra: int, headroom: int = 0, used: int | None = None) -> "KVCache":
        """Make room for `extra` more tokens after the first `used` slots (default: the length):
        if there is too little, this cache moves to new NumPy buffers with room for
        extra + headroom, keeping those slots (a copy; caches that shared the old buffers keep
        them). Everyone holding this cache then sees the room, e.g. a decoding loop whose cache
        EPIC's lookahead grew for its trees (`used` then covers the tree so far). Returns the cache."""
        used = self.length if used is None else used
        if self.capacity < used + extra or self.writes is None:
            self.values = _gather_slots(self.values, np.arange(self.rows), used, used + extra + headroom)
            self.writes = BufferWrites(used, scratch=used > self.length)
        return self

    def room_for_step(self, tokens: int, scratch: bool = False) -> "KVCache":
        """The cache a step of `tokens` new tokens per row writes into, in place: this one (moved to
        bigger buffers, with some to spare, if short of room) or a fork of it when its room holds
        another continuation already. The slots are marked written; `scratch`: by a lookahead,
        which the next continuation of this cache may overwrite."""
        cache = self
        if cache.room_is_free:
            cache.reserve(tokens, headroom=growth_headroom(cache.length, tokens))
        else:
            cache = cache.select(np.arange(cache.rows), room=tokens + growth_headroom(cache.length, tokens))
        cache.writes.end, cache.writes.scratch = cache.length + tokens, scratch  # type: ignore[union-attr]
        return cache

    def grow_room(self, tokens: int, used: int | None = None) -> "KVCache":
        """`reserve` with geometric headroom: room for `tokens` after the first `used` slots."""
        used = self.length if used is None else used
        return self.reserve(tokens, headroom=growth_headroom(used, tokens), used=used)

    def row_span(self, lo: int, n: int, attention_mask: np.ndarray, next_position: np.ndarray) -> "KVCache":
        """Rows lo..lo+n-1 of this cache's buffers (views, so appending writes into this cache's
        room), as a cache with the given mask and positions: a token tree run in the room after
        the decoding cache itself."""
        values = self.values if lo == 0 and n == self.rows else [v[lo:lo + n] for v in self.values]
        return KVCache(values=values, attention_mask=attention_mask, next_position=next_position, writes=self.writes)

    def gather_blocks(self, block_rows: np.ndarray, room: int) -> "KVCache":
        """A new cache whose row u holds rows block_rows[u, 0], block_rows[u, 1], ... of this one side
        by side (-1: an empty block, masked out), with room for `room` tokens after them: short
        rows' prefixes packed into one model row, each tree token seeing its own block only."""
        units, blocks = block_rows.shape
        src = np.maximum(block_rows, 0)
        length = self.length
        mask = np.where(block_rows[..., None] < 0, 0, self.attention_mask[src]).reshape(units, -1)
        if self.on_device:
            return KVCache(values=self.device_ops.blocks(self.values, src), attention_mask=mask,
                           next_position=np.zeros(units, dtype=np.int64), device_ops=self.device_ops)
        tensors = self.tensors()
        shape = (units, tensors[0].shape[1], blocks * length + room, tensors[0].shape[3])
        values = cache_buffers(len(tensors), shape, tensors[0].dtype)
        for a, out in zip(tensors, values):
            for b in range(blocks):
                out[:, :, b * length:(b + 1) * length] = a[src[:, b]]
        return KVCache(values=values, attention_mask=mask, next_position=np.zeros(units, dtype=np.int64),
                       writes=BufferWrites(blocks * length) if room else None)

    def columns(self, rows: np.ndarray, slots: np.ndarray) -> list[np.ndarray]:
        """Per cache tensor, the key/value columns [n, kv_heads, head_dim] at (rows[i], slots[i]): a
        copy, so they outlive scratch that is overwritten later."""
        if self.on_device:
            return self.device_ops.columns(self.values, np.asarray(rows, np.int64), np.asarray(slots, np.int64))
        return [as_numpy(v)[rows, :, slots] for v in self.values]

    def write_scratch(self, rows: np.ndarray, cols: np.ndarray, columns: Sequence[np.ndarray], width: int
                      ) -> "KVCache | None":
        """This cache extended by `width` scratch slots per row, of which slot cols[i] of row rows[i]
        gets the key/value columns columns[t][i] (tokens run by an earlier call, placed as that call
        would have written them); the others are masked. None where the room is not this cache's to
        write (too little of it, another continuation in it, or tensors that are not ours)."""
        past = self.length
        if self.writes is None or not self.room_is_free or self.capacity < past + width or \
                not all(isinstance(v, np.ndarray) for v in self.values):
            return None
        padded = rows.size < self.rows * width  # slots no token fills: masked, but must hold finite numbers
        for v, x in zip(self.values, columns):
            if padded:
                v[:, :, past:past + width] = 0
            v[rows, :, past + cols] = x
        real = np.zeros((self.rows, width), dtype=np.int64)
        real[rows, cols] = 1
        self.writes.end, self.writes.scratch = past + width, True
        return KVCache(values=self.values, attention_mask=np.concatenate([self.attention_mask, real], axis=1),
                       next_position=self.next_position + real.sum(axis=1), writes=self.writes)

    @property
    def appendable_in_place(self) -> bool:
        """A token per row can be written into this cache's own room (nothing else continues it)."""
        return self.capacity > self.length and self.writes is not None and self.room_is_free

    def append_columns(self, columns: Sequence[np.ndarray]) -> "KVCache":
        """This cache plus one token per row whose keys/values are `columns` ([rows, heads, 1,
        head_dim] per cache tensor), written into the room (there must be some): the token a
        lookahead already ran, kept without running it again."""
        n = self.length
        if self.on_device:
            mask = np.concatenate([self.attention_mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
            return KVCache(values=self.device_ops.append(self.values, columns), attention_mask=mask,
                           next_position=self.next_position + 1, device_ops=self.device_ops)
        for v, col in zip(self.values, columns):
            v[:, :, n] = col[:, :, 0]
        if self.writes is not None:
            self.writes.end, self.writes.scratch = n + 1, False
        mask = np.concatenate([self.attention_mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
        return KVCache(values=self.values, attention_mask=mask, next_position=self.next_position + 1,
                       writes=self.writes)

    @staticmethod
    def concat(caches: Sequence["KVCache"]) -> "KVCache":
        """Stack rows of caches that have the same length (used to merge lookahead winners)."""
        if len(caches) == 1:
            return caches[0]
        lengths = {c.length for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"cannot concat caches of lengths {sorted(lengths)}")
        if all(c.on_device for c in caches):
            return KVCache(values=caches[0].device_ops.concat([c.values for c in caches]),  # type: ignore[union-attr]
                           attention_mask=np.concatenate([c.attention_mask for c in caches]),
                           next_position=np.concatenate([c.next_position for c in caches]),
                           device_ops=caches[0].device_ops)
        parts = [c.tensors() for c in caches]
        return KVCache(
            values=[np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))],
            attention_mask=np.concatenate([c.attention_mask for c in caches]),
            next_position=np.concatenate([c.next_position for c in caches]),
        )


@dataclass
class _BoundBuffers:
    """An IO binding that has a cache's buffers bound as both past and present (in-place graphs).
    The next step on the same buffers rebinds only the small per-call inputs: binding 2 x layers
    tensors anew costs about as much as the sampling of a batch-1 step."""

    binding: Any
    values: list[np.ndarray]  # the arrays bound, in past_names order; keeps them alive

    def holds(self, values: Sequence[Any]) -> bool:
        return len(values) == len(self.values) and all(a is b for a, b in zip(values, self.values))


def as_numpy(v: Any) -> np.ndarray:
    """A cache tensor as a NumPy array (an OrtValue is copied to the host)."""
    return v if isinstance(v, np.ndarray) else v.numpy()


def _gather_slots(values: Sequence[Any], idx: np.ndarray, slots: int, capacity: int) -> list[np.ndarray]:
    """Rows idx of each cache tensor, its first `slots` positions, in new buffers of `capacity`."""
    first = as_numpy(values[0])
    out = cache_buffers(len(values), (idx.size, first.shape[1], capacity, first.shape[3]), first.dtype)
    for v, buf in zip(values, out):
        np.take(as_numpy(v)[:, :, :slots], idx, axis=0, out=buf[:, :, :slots], mode="clip")
    return out


def cache_buffers(count: int, shape: tuple[int, ...], dtype: Any) -> list[np.ndarray]:
    """`count` uninitialized cache tensors, carved out of one allocation. One large block goes
    back to the OS when freed; dozens of few-MB arrays would stay in the C heap's free lists (a
    decoding cache that grew once would keep its old size in RSS for good)."""
    block = np.empty((count, *shape), dtype=dtype)
    return list(block)


def _take_rows(v: Any, idx: np.ndarray) -> Any:
    """Rows idx of one cache tensor. The identity keeps the tensor as it is (an OrtValue stays
    where it lives, on the GPU too); anything else gathers on the host (zero-copy view on CPU)."""
    rows = v.shape[0] if isinstance(v, np.ndarray) else v.shape()[0]
    if idx.size == rows and np.array_equal(idx, np.arange(rows)):
        return v
    return np.take(as_numpy(v), idx, axis=0)


class KVBuffers:
    """Two preallocated sets of cache tensors, used in turn as the destination of each decoding
    step's new cache (the previous step's cache, its input, lives in the other set).

    ORT would otherwise allocate every step's present cache from its arena, which keeps the
    high-water mark of tensors that grow by one position per step: at 8 rows x 640 positions of
    SmolLM2 that slack is ~240 MB. Capacity is rows x max_length; pages are only touched as the
    cache fills. Whoever passes a set must not still need the cache that set held two steps ago
    (the plain decoding loop never does; EPIC's lookahead does not use them)."""

    def __init__(self, tensors: int, elements: int, dtype: Any):
        self._sets = [cache_buffers(tensors, (elements,), dtype) for _ in range(2)]
        self._turn = 0

    def next(self) -> list[np.ndarray]:
        self._turn ^= 1
        return self._sets[self._turn]


def growth_headroom(length: int, need: int) -> int:
    """Room to add, beyond the `need` slots a step takes, when an in-place cache runs out: a
    quarter of its length (geometric growth, so a cache grown step by step is copied O(log n)
    times) and at least `need` again. Not a fixed number of slots: a fork of 1,000 short rows
    would pay for it 1,000 times."""
    return max(need, length // 4)
