"""Lossless 4-bit packing of weights that already are 4-bit blocks.

A GGUF checkpoint quantized with llama.cpp's Q4_1 (SmolLM2's, and many others) reaches
transformers as float32 tensors whose every block of 32 inputs holds at most 16 values,
w = d * q + m with q in 0..15 and d, m float16 numbers. Stored as float32 those weights take
32 bits each, and a batch-1 decoding step on the CPU is bound by reading them. Stored as their
4-bit levels plus one (d, m) pair per block, the same numbers take 5 bits; ONNX Runtime's
MatMulNBits (accuracy_level 0) turns them back into float32 block by block and multiplies in
float32, so the model computes the same function, differing only in summation order.

MatMulNBits' zero point is an integer level, and m / d is not, so the offsets go through a
second, small product: x @ W.T = MatMulNBits(x; q, d) + blocksums(x) @ M.T, where
blocksums(x) sums each block of 32 inputs and M holds one offset per block (1/32 of the
float32 weights). MatMulNBits reads levels as q - 8 (no zero-point input: its faster kernel),
so M holds m + 8 d, exact in float32, or m with explicit zero points 0 where it is not.

llama.cpp's Q4_K (the 4-bit part of a Q4_K_M file) is the same within each block of 32: its
super-blocks of 256 hold 8 sub-blocks, each d_s * q - m_s with q in 0..15, where d_s = d * sc
and m_s = dmin * mn are products of a float16 number and a 6-bit integer (17 significant bits:
not float16 numbers, so the Q4_1 reading of the scale misses them). gguf-py dequantizes them in
float32 as fl(d_s * q - m_s), d_s * q exact. Such blocks are found by their step instead: the
smallest gap between their distinct values is d_s (or a multiple, where levels are missing), the
span over it gives the highest level k, and d_s is the float32 number nearest span / k or one of
its neighbours a few ulps away; the block's minimum is the offset. Q5_0, Q6_K and Q8_0 blocks
hold more than 16 values and stay float32.

A tensor is packed only when every block rebuilds bit for bit (float32(d * q + m) == w);
anything else stays a float32 MatMul.

Q8_0 blocks (SmolLM2's and Gemma 3's embeddings, which their lm_heads share) are d * q with q in
-127..127 and d = amax / 127 a float16 number. `pack_eight_bit` finds them for the int8-compute
export, where MatMulNBits' 8-bit kernel multiplies them with int8 dot products (accuracy_level 4);
with float32 arithmetic that kernel is ~20x slower than a float32 MatMul at one row, so the
default export keeps them float32. Needs only NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # llama.cpp's block length (Q4_0, Q4_1, Q5_*, Q8_0)
LEVELS = 16  # 4 bits
MIDPOINT = 8  # MatMulNBits' zero point for 4 bits when none is given
EIGHT_BIT_MIDPOINT = 128  # ... and for 8 bits
Q8_MAX = 127  # llama.cpp's Q8_0: d = amax / 127


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] weight as MatMulNBits operands: `levels` uint8 [out, in / BLOCK, BLOCK / 2]
    (two levels per byte, the even input in the low nibble), `scales` and `offsets` float32
    [out, in / BLOCK]: weight[o, b * BLOCK + j] == scales[o, b] * level + offsets[o, b]."""

    levels: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        out, blocks = self.scales.shape
        return out, blocks * BLOCK

    def midpoint_offsets(self) -> np.ndarray | None:
        """Offsets for levels read as level - 8, which is how MatMulNBits reads them when it gets
        no zero-point input (its faster kernel, ~10% at one row): m + 8 d, or None where float32
        cannot hold that sum exactly (d and m are float16 numbers of similar size in a Q4_1
        block, so in practice it always can)."""
        wide = self.offsets.astype(np.float64) + MIDPOINT * self.scales.astype(np.float64)
        narrow = wide.astype(np.float32)
        return narrow if np.array_equal(narrow.astype(np.float64), wide) else None

    def unpack(self) -> np.ndarray:
        """The float32 weight again (what the tests compare with)."""
        low, high = self.levels & 0x0F, self.levels >> 4
        q = np.stack([low, high], axis=-1).reshape(*self.scales.shape, BLOCK).astype(np.float32)
        return (self.scales[..., None] * q + self.offsets[..., None]).reshape(self.shape)


def pack_four_bit(weight: np.ndarray) -> PackedWeight | None:
    """`weight` [out, in] as 4-bit blocks when that loses nothing, else None.

    Each block's smallest value is its offset m. Its scale d is first read as Q4_1 writes it:
    the float16 number nearest (max - min) / 15 (llama.cpp maps a block's min and max to levels
    0 and 15); blocks that do not rebuild with it get their scale from their step (Q4_K's
    sub-blocks, see the module's docstring). The whole tensor is kept only if every block then
    rebuilds exactly."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[1] % BLOCK or weight.size == 0:
        return None
    out, inputs = weight.shape
    if out > 1 and pack_four_bit(weight[:1]) is None:  # most weights fail on their first row: skip the rest
        return None
    blocks = weight.reshape(out, inputs // BLOCK, BLOCK)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None
    with np.errstate(over="ignore"):
        scales = ((hi.astype(np.float64) - lo) / (LEVELS - 1)).astype(np.float16).astype(np.float32)
    scales = np.where(np.isfinite(scales), scales, np.float32(0))
    q, ok = _levels(blocks, lo, scales)
    if not ok.all():
        flat = blocks[~ok]
        stepped, q_stepped, ok_stepped = _stepped(flat, lo[~ok])
        if not ok_stepped.all():
            return None
        scales = scales.copy()
        scales[~ok], q[~ok] = stepped, q_stepped
    levels = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return PackedWeight(np.ascontiguousarray(levels), scales, np.ascontiguousarray(lo, dtype=np.float32))


def _levels(blocks: np.ndarray, lo: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels uint8, whether each block rebuilds exactly from them) for blocks [..., BLOCK] with
    offsets `lo` and scales `scales` [...]."""
    divisor = np.where(scales == 0, np.float32(1), scales)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint((blocks - lo[..., None]) / divisor)
    in_range = np.all((q >= 0) & (q <= LEVELS - 1), axis=-1)
    q = np.clip(np.nan_to_num(q), 0, LEVELS - 1).astype(np.uint8)
    rebuilt = scales[..., None] * q.astype(np.float32) + lo[..., None]
    return q, in_range & np.all(rebuilt == blocks, axis=-1)


ULP_TRIES = (0, 1, -1, 2, -2, 3, -3)  # neighbours of span / k tried as the scale (float32 ulps)


def _stepped(blocks: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales, levels and success of blocks [n, BLOCK] whose scale is not a float16 number:
    d is span / k, k the span over the smallest gap between distinct values, to a few ulps."""
    ordered = np.sort(blocks, axis=-1).astype(np.float64)
    gaps = np.diff(ordered, axis=-1)
    gaps[gaps <= 0] = np.inf
    step = gaps.min(axis=-1)
    span = ordered[:, -1] - ordered[:, 0]
    flat = ~np.isfinite(step)  # one value only: any scale, level 0
    k = np.where(flat, 1.0, np.rint(span / np.where(flat, 1.0, step)))
    nearest = np.where((k >= 1) & (k <= LEVELS - 1), span / np.maximum(k, 1), np.nan).astype(np.float32)
    scales = np.zeros(blocks.shape[0], dtype=np.float32)
    q = np.zeros(blocks.shape, dtype=np.uint8)
    done = np.zeros(blocks.shape[0], dtype=bool)
    for ulps in ULP_TRIES:
        todo = ~done & np.isfinite(nearest)
        if not todo.any():
            break
        d = nearest[todo]
        for _ in range(abs(ulps)):
            d = np.nextafter(d, np.float32(np.inf if ulps > 0 else -np.inf))
        q_try, ok = _levels(blocks[todo], lo[todo], d)
        idx = np.flatnonzero(todo)[ok]
        scales[idx], q[idx], done[idx] = d[ok], q_try[ok], True
    return scales, q, done


@dataclass(frozen=True)
class EightBitWeight:
    """A [out, in] weight as 8-bit MatMulNBits operands: `levels` uint8 [out, in / BLOCK, BLOCK]
    (q + 128) and `scales` float32 [out, in / BLOCK]: weight[o, b * BLOCK + j] == scales[o, b] * q."""

    levels: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        out, blocks = self.scales.shape
        return out, blocks * BLOCK

    def unpack(self) -> np.ndarray:
        q = self.levels.astype(np.float32) - EIGHT_BIT_MIDPOINT
        return (self.scales[..., None] * q).reshape(self.shape)


def pack_eight_bit(weight: np.ndarray) -> EightBitWeight | None:
    """`weight` [out, in] as llama.cpp Q8_0 blocks when that loses nothing, else None: each block's
    scale is the float16 number nearest amax / 127 (the level of its largest weight is ±127), and
    the whole tensor is kept only if every block then rebuilds exactly from integer levels."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[1] % BLOCK or weight.size == 0:
        return None
    out, inputs = weight.shape
    if out > 1 and pack_eight_bit(weight[:1]) is None:  # most weights fail on their first row
        return None
    levels = np.empty((out, inputs // BLOCK, BLOCK), np.uint8)
    scales = np.empty((out, inputs // BLOCK), np.float32)
    for start in range(0, out, ROWS_AT_ONCE):  # a 262k-row embedding in slices: bounded temporaries
        part = _eight_bit_blocks(weight[start:start + ROWS_AT_ONCE].reshape(-1, inputs // BLOCK, BLOCK))
        if part is None:
            return None
        levels[start:start + ROWS_AT_ONCE], scales[start:start + ROWS_AT_ONCE] = part
    return EightBitWeight(levels, scales)


ROWS_AT_ONCE = 8192


def _eight_bit_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(levels q + 128, scales) of blocks [..., BLOCK] that are exact Q8_0 blocks, else None."""
    if not np.all(np.isfinite(blocks)):
        return None
    amax = np.abs(blocks).max(axis=-1)
    scales = (amax.astype(np.float64) / Q8_MAX).astype(np.float16).astype(np.float32)
    q = np.rint(blocks / np.where(scales == 0, np.float32(1), scales)[..., None])
    if np.abs(q).max() > Q8_MAX or not np.array_equal(scales[..., None] * q, blocks):
        return None
    return (q + EIGHT_BIT_MIDPOINT).astype(np.uint8), scales
