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

A tensor is packed only when every block rebuilds bit for bit (float32(d * q + m) == w);
anything else stays a float32 MatMul. Needs only NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # llama.cpp's block length (Q4_0, Q4_1, Q5_*, Q8_0)
LEVELS = 16  # 4 bits
MIDPOINT = 8  # MatMulNBits' zero point for 4 bits when none is given


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

    Each block's smallest value is its offset m and its largest is m + 15 d (llama.cpp's Q4_1
    maps a block's min and max to levels 0 and 15); d is read back as the float16 number
    nearest (max - min) / 15, and the whole tensor is kept only if every block then rebuilds
    exactly."""
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
    if not np.all(np.isfinite(scales)):
        return None
    divisor = np.where(scales == 0, np.float32(1), scales)[..., None]
    q = np.rint((blocks - lo[..., None]) / divisor)
    if q.min() < 0 or q.max() > LEVELS - 1:
        return None
    q = q.astype(np.uint8)
    if not np.array_equal(scales[..., None] * q.astype(np.float32) + lo[..., None], blocks):
        return None
    levels = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return PackedWeight(np.ascontiguousarray(levels), scales, np.ascontiguousarray(lo, dtype=np.float32))
