"""The lean graph's products x @ W.T (+ b): float32 MatMul, or exact 4-bit or 8-bit blocks.

A weight that is exactly 4-bit blocks (a Q4_1 GGUF's, as SmolLM2's, or Q4_K's, as Gemma 3 Q4_K_M's
o_proj and half of its down_proj) stays 4-bit: its product
becomes MatMulNBits plus the blocks' offsets (ReduceSum, a small MatMul, Add); packing.py says why
this is lossless. A bias is one Add after either.

Arithmetic: float32 by default (accuracy_level 0: the model computes what transformers does, to
float32 rounding). With compute "int8" (`int8_compute`) MatMulNBits quantizes each block of 32
activations to int8 and multiplies with int8 dot products (accuracy_level 4: VNNI/AMX kernels in MLAS), and weights
that are exact Q8_0 blocks (the tied lm_head of a GGUF with a Q8_0 embedding) become 8-bit
MatMulNBits too, at the cost of the activations' rounding. Whether that pays depends on the CPU's
kernels and on the rows a call carries (one token a row when decoding, tens to hundreds in EPIC's
trees): bench/int8_kernels.py measures it per machine.

With compute "int8-gemm" (`int8_gemm`) every product of the decoder layers is ONNX Runtime's int8
GEMM (MatMulInteger): weights rounded to int8 with one scale per output column, activations to uint8 with one scale per
row (token), at run time, after smoothing (smoothing.py) moves their outlier channels' range into the
weights. MLAS's blocked GEMM kernels (VNNI, AMX tiles) make this several times
faster than float32 at tens of rows or more, where MatMulNBits' int8 path, a dot product per block,
gains little; it costs two roundings instead of none, so it is opt-in and its perplexity is measured.
The lm_head is not an int8 GEMM: rounding its activations per token cost a third of int8-gemm's
perplexity change. A tied head on exact Q8_0 blocks is 8-bit MatMulNBits with int8 dot products
(activations per block of 32, as compute "int8"); any other head stays float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..packing import BLOCK, EightBitWeight, PackedWeight, pack_eight_bit, pack_four_bit
from .graph import BATCH, MS_DOMAIN, SEQ, GraphBuilder
from .smoothing import smoothing_scales

_FLOAT32, _UINT8, _INT32 = 1, 2, 6  # onnx.TensorProto's element types


class Projector:
    """Writes the products of one graph and counts how many stayed 4-bit."""

    def __init__(self, g: GraphBuilder, weights: dict[str, np.ndarray], pack: bool, compute: str = "fp32",
                 peaks: dict[str, np.ndarray] | None = None) -> None:
        """compute: "fp32", "int8" (`int8_compute`) or "int8-gemm" (`int8_gemm`), as the module says.
        peaks: each product input's largest |activation| per channel, keyed by weight name; int8-gemm
        smooths the products it has (smoothing.py)."""
        self.g, self.weights, self.pack, self.peaks = g, weights, pack, peaks or {}
        self.int8_compute, self.int8_gemm = compute == "int8", compute == "int8-gemm"
        self.accuracy_level = 4 if self.int8_compute else 0
        self._quantized: dict[str, tuple[str, str]] = {}  # activation -> its uint8 levels and row scales
        self.packed = 0

    def __call__(self, name: str, x: str, weights: Sequence[str], key: str,
                 biases: Sequence[str] | None = None) -> str:
        """x @ W.T for nn.Linear weights [out, in] (several: stacked along out, one product, stored
        as `key`); `biases` (one per weight) are added after it."""
        w = self.weights
        stacked = np.concatenate([w[k] for k in weights], axis=0) if len(weights) > 1 else w[weights[0]]
        shape = [BATCH, SEQ, stacked.shape[0]]
        if self.int8_gemm:
            found = [self.peaks[k] for k in weights if k in self.peaks]
            peak = np.maximum.reduce(found) if found else None
            out = self.int8_product(name, x, key, stacked, shape, peak=peak)
            return out if not biases else self._add_bias(name, key, out, biases, shape)
        packed = pack_four_bit(stacked) if self.pack else None
        eight = pack_eight_bit(stacked) if packed is None and self.pack and self.int8_compute else None
        if packed is not None:
            self.packed += 1
            out = self._four_bit(name, x, key, packed, shape)
        elif eight is not None:
            self.packed += 1
            out = self.eight_bit(name, x, key, eight, shape)
        else:
            out = self.g.op("MatMul", name, [x, self.g.const(key, stacked.T)], [shape])
        if not biases:
            return out
        return self._add_bias(name, key, out, biases, shape)

    def _add_bias(self, name: str, key: str, out: str, biases: Sequence[str], shape: list) -> str:
        w = self.weights
        bias = np.concatenate([w[b] for b in biases]) if len(biases) > 1 else w[biases[0]]
        return self.g.op("Add", name + "/bias", [out, self.g.const(_bias_name(key), bias)], [shape])

    def int8_product(self, name: str, x: str, key: str, weight: np.ndarray, shape: list,
                     output: str | None = None, peak: np.ndarray | None = None) -> str:
        """x @ weight.T as int8 GEMM: (s_row(x) * s_col) * (levels(x) - 128) @ q(weight).T, where
        s_row = max|x| / 127 per row (rounded to uint8 levels around 128, MatMulInteger's zero point)
        and q, s_col the weight's symmetric int8 levels and scale per output column. With `peak`
        (x's largest |entry| per channel on real text), x / s and weight * s replace x and weight."""
        g = self.g
        if peak is not None:
            smooth = smoothing_scales(peak, weight)
            weight = weight * smooth[None, :]
            x = g.op("Mul", name + "/smooth", [x, g.const(key + ".smoothing", 1 / smooth)], [shape[:-1] + [len(smooth)]])
        levels, column_scale = int8_columns(weight)
        xq, row_scale = self._quantize_rows(x, shape[:-1], weight.shape[1])
        products = g.op("MatMulInteger", name, [xq, g.const(key + ".int8", levels.T),
                                                g.shared_const("int8_gemm/zero_point", 128, np.uint8)],
                        [shape], dtype=_INT32)
        as_float = g.op("Cast", name + "/float", [products], [shape], dtype=_FLOAT32, to=_FLOAT32)
        by_row = g.op("Mul", name + "/row_scales", [as_float, row_scale], [shape])
        return g.op("Mul", name + "/column_scales", [by_row, g.const(key + ".int8_scales", column_scale)], [shape],
                    outputs=[output] if output else None)

    def _quantize_rows(self, x: str, lead: list, width: int) -> tuple[str, str]:
        """x's uint8 levels round(x / s) + 128 and its scales s = max(|x|) / 127 per row [.., 1]; made
        once per activation (the products that read the same x share them)."""
        if x in self._quantized:
            return self._quantized[x]
        g, n, full = self.g, x + "/int8", lead + [width]
        absolute = g.op("Abs", n + "/abs", [x], [full])
        peak = g.op("ReduceMax", n + "/peak", [absolute, g.shared_const("int8_gemm/last_axis", [-1])], [lead + [1]],
                    keepdims=1)
        floor = g.shared_const("int8_gemm/floor", 1e-30, np.float32)
        scale = g.op("Mul", n + "/scale", [g.op("Max", n + "/peak_floor", [peak, floor], [lead + [1]]),
                                           g.shared_const("int8_gemm/inv127", 1 / 127, np.float32)], [lead + [1]])
        shifted = g.op("Add", n + "/shift", [g.op("Div", n + "/divide", [x, scale], [full]),
                                            g.shared_const("int8_gemm/128", 128.0, np.float32)], [full])
        levels = g.op("Cast", n + "/levels", [g.op("Round", n + "/round", [shifted], [full])], [full],
                      dtype=_UINT8, to=_UINT8)
        self._quantized[x] = (levels, scale)
        return levels, scale

    def _four_bit(self, name: str, x: str, key: str, packed: PackedWeight, shape: list) -> str:
        """MatMulNBits of the levels plus blocksums(x) @ offsets.T (see packing.py)."""
        g = self.g
        out_features, in_features = packed.shape
        blocks = in_features // BLOCK
        operands = [x, g.const(key + ".levels", packed.levels), g.const(key + ".scales", packed.scales.reshape(-1))]
        offsets = packed.midpoint_offsets()  # levels read as q - 8 (no zero points: the faster kernel)
        if offsets is None:  # levels read as q, with explicit zero points 0
            offsets = packed.offsets
            operands.append(g.const(key + ".zero_points", np.zeros(out_features * ((blocks + 1) // 2), np.uint8)))
        main = g.op("MatMulNBits", name, operands, [shape], domain=MS_DOMAIN,
                    K=in_features, N=out_features, bits=4, block_size=BLOCK, accuracy_level=self.accuracy_level)
        block_shape = g.shared_const(f"packing/block_shape_{blocks}", [0, 0, blocks, BLOCK])
        grouped = g.op("Reshape", name + "/blocks", [x, block_shape], [[BATCH, SEQ, blocks, BLOCK]])
        sums = g.op("ReduceSum", name + "/block_sums", [grouped, g.shared_const("packing/last_axis", [-1])],
                    [[BATCH, SEQ, blocks]], keepdims=0)
        shift = g.op("MatMul", name + "/offsets", [sums, g.const(key + ".offsets", offsets.T)], [shape])
        return g.op("Add", name + "/with_offsets", [main, shift], [shape])


    def eight_bit(self, name: str, x: str, key: str, packed: EightBitWeight, shape: list,
                  output: str | None = None, accuracy_level: int | None = None) -> str:
        """One 8-bit MatMulNBits (levels q + 128: its default zero point, so no offsets). MLAS has no
        fast float32 path for 8 bits (it dequantizes the whole matrix each call), hence the level."""
        g = self.g
        out_features, in_features = packed.shape
        operands = [x, g.const(key + ".q8_levels", packed.levels), g.const(key + ".q8_scales", packed.scales.reshape(-1))]
        return g.op("MatMulNBits", name, operands, [shape], outputs=[output] if output else None, domain=MS_DOMAIN,
                    K=in_features, N=out_features, bits=8, block_size=BLOCK,
                    accuracy_level=self.accuracy_level if accuracy_level is None else accuracy_level)


def int8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A weight [out, in]'s symmetric int8 levels and its float32 scale per output row (column of W.T)."""
    scale = np.maximum(np.abs(weight).max(axis=1), 1e-30).astype(np.float32) / np.float32(127)
    levels = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return levels, scale


def _bias_name(key: str) -> str:
    return key[: -len(".weight")] + ".bias" if key.endswith(".weight") else key + ".bias"
