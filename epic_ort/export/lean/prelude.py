"""What every layer of the lean graph shares, computed once at the top of the graph: the
additive attention bias, GroupQueryAttention's length inputs and the rotary tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .architectures import Dims
from .graph import BATCH, SEQ, TOTAL, GraphBuilder

MASKED_SCORE = -1e30  # added to a masked key's score: finite, so a fully masked row is uniform, never NaN
_BOOL, _INT32, _INT64 = 9, 6, 7  # onnx.TensorProto element types


@dataclass(frozen=True)
class Prelude:
    """Names of the shared tensors. `fused_rotary`: attention rotates q and k itself from the
    `cos`/`sin` rows; otherwise RotaryEmbedding nodes read the full tables at position_ids."""

    bias: str
    seqlens_k: str
    total_len: str
    query_lens: str
    cos: str
    sin: str
    fused_rotary: bool


def build_prelude(g: GraphBuilder, dims: Dims, inv_freq: np.ndarray) -> Prelude:
    """The shared tensors, in the order the graph computes them."""
    keys, bias, total_1d, seq = _attention_bias(g)
    seqlens_k, total_len, query_lens = _attention_lengths(g, total_1d, seq)
    cos, sin, fused = _rotary_tables(g, dims, inv_freq, keys)
    return Prelude(bias, seqlens_k, total_len, query_lens, cos, sin, fused)


def _attention_bias(g: GraphBuilder) -> tuple[str, str, str, str]:
    """bias[b, 0, s, t] = 0 where key t is a real token (attention_mask) AND t is not after query
    s (causal, offset by the past length) AND tree_mask[b, s, t]; MASKED_SCORE elsewhere. The
    runtime feeds a [1, 1, 1] True tree_mask for ordinary decoding; EPIC's lookahead feeds a token
    tree (many candidates and rollouts as positions of one row over one shared prefix, each seeing
    only its ancestors). Returns (key indices, bias, [total length], sequence length)."""
    B, T, Q = BATCH, TOTAL, SEQ
    pad = g.op("Cast", "mask/pad_bool", ["attention_mask"], [[B, T]], dtype=_BOOL, to=_BOOL)
    pad = g.op("Unsqueeze", "mask/pad", [pad, g.const("mask/axes_12", [1, 2], np.int64)], [[B, 1, 1, T]],
               dtype=_BOOL)
    zero, one = g.const("mask/zero", 0, np.int64), g.const("mask/one", 1, np.int64)
    total_1d = g.op("Shape", "mask/total_1d", ["attention_mask"], [[1]], dtype=_INT64, start=1, end=2)
    total = g.op("Squeeze", "mask/total", [total_1d], [[]], dtype=_INT64)
    seq = g.op("Squeeze", "mask/seq", [g.op("Shape", "mask/seq_1d", ["input_ids"], [[1]], dtype=_INT64,
                                              start=1, end=2)], [[]], dtype=_INT64)
    keys = g.op("Range", "mask/keys", [zero, total, one], [[T]], dtype=_INT64)
    queries = g.op("Range", "mask/queries", [g.op("Sub", "mask/past", [total, seq], [[]], dtype=_INT64), total, one],
                   [[Q]], dtype=_INT64)
    queries = g.op("Unsqueeze", "mask/queries_col", [queries, g.const("mask/axes_1", [1], np.int64)], [[Q, 1]],
                   dtype=_INT64)
    causal = g.op("LessOrEqual", "mask/causal", [keys, queries], [[Q, T]], dtype=_BOOL)
    tree = g.op("Unsqueeze", "mask/tree", ["tree_mask", g.const("mask/axes_1b", [1], np.int64)],
                [["tree_batch", 1, "tree_queries", "tree_keys"]], dtype=_BOOL)
    mask = g.op("And", "mask/pad_causal", [pad, causal], [[B, 1, Q, T]], dtype=_BOOL)
    mask = g.op("And", "mask/all", [mask, tree], [[B, 1, Q, T]], dtype=_BOOL)
    bias = g.op("Where", "mask/bias", [mask, g.const("mask/open", 0.0, np.float32),
                                       g.const("mask/shut", MASKED_SCORE, np.float32)], [[B, 1, Q, T]])
    return keys, bias, total_1d, seq


def _attention_lengths(g: GraphBuilder, total_1d: str, seq: str) -> tuple[str, str, str]:
    """GroupQueryAttention's lengths: every row has `total` slots (left padding is masked by the
    bias), so each row's new keys land at slots total - seq ... total - 1 of its cache buffer.
    Returns (seqlens_k, total_sequence_length, query lengths)."""
    B = BATCH
    rows = g.op("Shape", "mask/rows", ["attention_mask"], [[1]], dtype=_INT64, start=0, end=1)
    total_i32 = g.op("Cast", "mask/total_i32", [total_1d], [[1]], dtype=_INT32, to=_INT32)
    total_len = g.op("Squeeze", "mask/total_len", [total_i32], [[]], dtype=_INT32)
    last = g.op("Sub", "mask/last_slot", [total_i32, g.const("mask/one_i32", [1], np.int32)], [[1]], dtype=_INT32)
    seqlens_k = g.op("Expand", "mask/seqlens_k", [last, rows], [[B]], dtype=_INT32)
    seq_i32 = g.op("Cast", "mask/seq_i32", [seq], [[]], dtype=_INT32, to=_INT32)
    query_lens = g.op("Expand", "mask/query_lens", [seq_i32, rows], [[B]], dtype=_INT32)
    return seqlens_k, total_len, query_lens


def _rotary_tables(g: GraphBuilder, dims: Dims, inv_freq: np.ndarray, keys: str) -> tuple[str, str, bool]:
    """cos/sin of [max_position_embeddings, head_dim / 2], computed in float64 from the model's own
    inv_freq, so they also survive an fp16 conversion without the phase error of computing angles
    in fp16.

    GroupQueryAttention's own rotary needs head_dim % 16 == 0 (every released Llama-family model);
    narrower heads (tiny test models) rotate in RotaryEmbedding nodes first: the same numbers.
    Attention wants tables at least as long as the keys (past + new), and an EPIC token tree or a
    packed lookahead row holds more keys than max_position_embeddings while no position reaches it
    (siblings share positions). It reads the tables only at position_ids (< max positions, <= the
    key index), so the rows 0 .. keys-1 of the tables (clipped to the last) serve: a gather of
    keys x head_dim/2 per call, once for all layers."""
    max_pos, half = dims.max_positions, dims.head_dim // 2
    angles = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    cos = g.const("rotary.cos", np.cos(angles), np.float32)
    sin = g.const("rotary.sin", np.sin(angles), np.float32)
    fused = dims.head_dim % 16 == 0
    if fused:
        rows = g.op("Min", "rotary/rows", [keys, g.const("rotary/last_row", max_pos - 1, np.int64)], [[TOTAL]],
                    dtype=_INT64)
        cos = g.op("Gather", "rotary/cos_rows", [cos, rows], [[TOTAL, half]])
        sin = g.op("Gather", "rotary/sin_rows", [sin, rows], [[TOTAL, half]])
    return cos, sin, fused


def inv_freq(hf_model: Any, config: Any, head_dim: int) -> np.ndarray:
    """The model's own inverse frequencies (transformers computes them in float32)."""
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    buf = getattr(rotary, "inv_freq", None)
    if buf is not None and getattr(rotary, "attention_scaling", 1.0) == 1.0:
        return buf.detach().to("cpu").float().numpy()
    theta = np.float32(getattr(config, "rope_theta", 10000.0))
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))).astype(np.float32)
