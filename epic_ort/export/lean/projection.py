"""The lean graph's products x @ W.T (+ b): float32 MatMul, or exact 4-bit blocks.

A weight that is exactly 4-bit blocks (a Q4_1 GGUF's, as SmolLM2's, or Q4_K's, as Gemma 3 Q4_K_M's
o_proj and half of its down_proj) stays 4-bit: its product
becomes MatMulNBits (float32 arithmetic) plus the blocks' offsets (ReduceSum, a small MatMul,
Add); packing.py says why this is lossless. A bias is one Add after either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..packing import BLOCK, PackedWeight, pack_four_bit
from .graph import BATCH, MS_DOMAIN, SEQ, GraphBuilder


class Projector:
    """Writes the products of one graph and counts how many stayed 4-bit."""

    def __init__(self, g: GraphBuilder, weights: dict[str, np.ndarray], pack: bool) -> None:
        self.g, self.weights, self.pack = g, weights, pack
        self.packed = 0

    def __call__(self, name: str, x: str, weights: Sequence[str], key: str,
                 biases: Sequence[str] | None = None) -> str:
        """x @ W.T for nn.Linear weights [out, in] (several: stacked along out, one product, stored
        as `key`); `biases` (one per weight) are added after it."""
        w = self.weights
        stacked = np.concatenate([w[k] for k in weights], axis=0) if len(weights) > 1 else w[weights[0]]
        shape = [BATCH, SEQ, stacked.shape[0]]
        packed = pack_four_bit(stacked) if self.pack else None
        if packed is None:
            out = self.g.op("MatMul", name, [x, self.g.const(key, stacked.T)], [shape])
        else:
            self.packed += 1
            out = self._four_bit(name, x, key, packed, shape)
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
                    K=in_features, N=out_features, bits=4, block_size=BLOCK, accuracy_level=0)
        block_shape = g.shared_const(f"packing/block_shape_{blocks}", [0, 0, blocks, BLOCK])
        grouped = g.op("Reshape", name + "/blocks", [x, block_shape], [[BATCH, SEQ, blocks, BLOCK]])
        sums = g.op("ReduceSum", name + "/block_sums", [grouped, g.shared_const("packing/last_axis", [-1])],
                    [[BATCH, SEQ, blocks]], keepdims=0)
        shift = g.op("MatMul", name + "/offsets", [sums, g.const(key + ".offsets", offsets.T)], [shape])
        return g.op("Add", name + "/with_offsets", [main, shift], [shape])


def _bias_name(key: str) -> str:
    return key[: -len(".weight")] + ".bias" if key.endswith(".weight") else key + ".bias"
