"""The lean graph's products x @ W.T (+ b): float32 MatMul, or exact 4-bit or 8-bit blocks.

A weight that is exactly 4-bit blocks (a Q4_1 GGUF's, as SmolLM2's, or Q4_K's, as Gemma 3 Q4_K_M's
o_proj and half of its down_proj) stays 4-bit: its product
becomes MatMulNBits plus the blocks' offsets (ReduceSum, a small MatMul, Add); packing.py says why
this is lossless. A bias is one Add after either.

Arithmetic: float32 by default (accuracy_level 0: the model computes what transformers does, to
float32 rounding). With `int8_compute` MatMulNBits quantizes each block of 32 activations to int8
and multiplies with int8 dot products (accuracy_level 4: VNNI/AMX kernels in MLAS), and weights
that are exact Q8_0 blocks (the tied lm_head of a GGUF with a Q8_0 embedding) become 8-bit
MatMulNBits too, at the cost of the activations' rounding. Whether that pays depends on the CPU's
kernels and on the rows a call carries (one token a row when decoding, tens to hundreds in EPIC's
trees): bench/int8_kernels.py measures it per machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..packing import BLOCK, EightBitWeight, PackedWeight, pack_eight_bit, pack_four_bit
from .graph import BATCH, MS_DOMAIN, SEQ, GraphBuilder


class Projector:
    """Writes the products of one graph and counts how many stayed 4-bit."""

    def __init__(self, g: GraphBuilder, weights: dict[str, np.ndarray], pack: bool, int8_compute: bool = False) -> None:
        self.g, self.weights, self.pack, self.int8_compute = g, weights, pack, int8_compute
        self.accuracy_level = 4 if int8_compute else 0
        self.packed = 0

    def __call__(self, name: str, x: str, weights: Sequence[str], key: str,
                 biases: Sequence[str] | None = None) -> str:
        """x @ W.T for nn.Linear weights [out, in] (several: stacked along out, one product, stored
        as `key`); `biases` (one per weight) are added after it."""
        w = self.weights
        stacked = np.concatenate([w[k] for k in weights], axis=0) if len(weights) > 1 else w[weights[0]]
        shape = [BATCH, SEQ, stacked.shape[0]]
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
        bias = np.concatenate([w[b] for b in biases]) if len(biases) > 1 else w[biases[0]]
        return self.g.op("Add", name + "/bias", [out, self.g.const(_bias_name(key), bias)], [shape])

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
                  output: str | None = None) -> str:
        """One 8-bit MatMulNBits (levels q + 128: its default zero point, so no offsets)."""
        g = self.g
        out_features, in_features = packed.shape
        operands = [x, g.const(key + ".q8_levels", packed.levels), g.const(key + ".q8_scales", packed.scales.reshape(-1))]
        return g.op("MatMulNBits", name, operands, [shape], outputs=[output] if output else None, domain=MS_DOMAIN,
                    K=in_features, N=out_features, bits=8, block_size=BLOCK, accuracy_level=self.accuracy_level)


def _bias_name(key: str) -> str:
    return key[: -len(".weight")] + ".bias" if key.endswith(".weight") else key + ".bias"
