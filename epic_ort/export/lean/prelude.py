"""What every layer of the lean graph shares, computed once at the top of the graph: the
additive attention biases (one per sliding window besides the full one), GroupQueryAttention's
length inputs and the rotary tables (one pair per rotary base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .architectures import Dims
from .graph import BATCH, SEQ, TOTAL, GraphBuilder

MASKED_SCORE = -1e30  # added to a masked key's score: finite, so a fully masked row is uniform, never NaN
# fp16 tops out at 65504: -1e30 would be -inf, and a fully masked row (a left-padding query) NaN, which its
# values then carry into every later layer's keys. -2**15 is exact in fp16, leaves room for any score added
# to it, and exp() of it is 0 in every precision.
MASKED_SCORE_FP16 = -32768.0
_BOOL, _INT32, _INT64 = 9, 6, 7  # onnx.TensorProto element types


GLOBAL = "global"  # the rotary tables of rope_theta (every layer of most models)
LOCAL = "local"  # Gemma 3's sliding-window layers' own base


@dataclass(frozen=True)
class Prelude:
    """Names of the shared tensors. `fused_rotary`: attention rotates q and k itself from the
    cos/sin rows; otherwise RotaryEmbedding nodes read the full tables at position_ids.
    `rotary` maps GLOBAL (and LOCAL where the model has it) to its (cos, sin); `windowed` maps
    each sliding window to its bias."""

    bias: str
    seqlens_k: str
    total_len: str
    query_lens: str
    rotary: dict[str, tuple[str, str]]
    fused_rotary: bool
    windowed: dict[int, str] = field(default_factory=dict)

    @property
    def cos(self) -> str:
        return self.rotary[GLOBAL][0]

    @property
    def sin(self) -> str:
        return self.rotary[GLOBAL][1]

    def bias_for(self, window: int | None) -> str:
        return self.bias if window is None else self.windowed[window]


def build_prelude(g: GraphBuilder, dims: Dims, inv_freqs: np.ndarray | dict[str, np.ndarray],
                  windows: tuple[int | None, ...] = ()) -> Prelude:
    """The shared tensors, in the order the graph computes them. `inv_freqs`: the inverse
    frequencies of each rotary base (an array: GLOBAL's only); `windows`: the layers' windows."""
    if isinstance(inv_freqs, np.ndarray):
        inv_freqs = {GLOBAL: inv_freqs}
    keys, mask, bias, total_1d, seq = _attention_bias(g)
    windowed = {w: _window_bias(g, mask, w) for w in sorted({w for w in windows if w is not None})}
    seqlens_k, total_len, query_lens = _attention_lengths(g, total_1d, seq)
    rotary, fused = {}, False
    for kind, freqs in inv_freqs.items():
        cos, sin, fused = _rotary_tables(g, dims, freqs, keys, "" if kind == GLOBAL else "_" + kind)
        rotary[kind] = (cos, sin)
    return Prelude(bias, seqlens_k, total_len, query_lens, rotary, fused, windowed)


def _attention_bias(g: GraphBuilder) -> tuple[str, str, str, str, str]:
    """bias[b, 0, s, t] = 0 where key t is a real token (attention_mask) AND t is not after query
    s (causal, offset by the past length) AND tree_mask[b, s, t]; MASKED_SCORE elsewhere. The
    runtime feeds a [1, 1, 1] True tree_mask for ordinary decoding; EPIC's lookahead feeds a token
    tree (many candidates and rollouts as positions of one row over one shared prefix, each seeing
    only its ancestors). Returns (key indices, that mask, bias, [total length], sequence length)."""
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
    shut = MASKED_SCORE if g.float_np == np.float32 else MASKED_SCORE_FP16
    bias = g.op("Where", "mask/bias", [mask, g.const("mask/open", 0.0, np.float32),
                                       g.const("mask/shut", shut, np.float32)], [[B, 1, Q, T]])
    return keys, mask, bias, total_1d, seq


def _window_bias(g: GraphBuilder, mask: str, window: int) -> str:
    """The bias of a layer that sees only the `window` most recent keys: a key is in the window of
    query s when fewer than `window` of the keys s sees lie at or after it, i.e. when its position
    is within window - 1 of the query's (transformers: kv_idx > q_idx - sliding_window).

    Counting the keys a query sees, rather than comparing slots, is what keeps the window exact in
    EPIC's token trees: a tree token sits at a slot after every candidate and rollout before it,
    but what it sees (its prefix, its ancestors, itself) is, slot after slot, exactly its own
    history, one position each, as in a row of its own; the k-th last key it sees is k - 1
    positions back. In ordinary rows (left padding, then real tokens) the count is the slot
    distance. So no input carries key positions, and the runtime is unchanged."""
    B, T, Q = BATCH, TOTAL, SEQ
    n = f"mask/window_{window}"
    seen = g.op("Cast", n + "/seen", [mask], [[B, 1, Q, T]], dtype=_INT32, to=_INT32)
    later = g.op("CumSum", n + "/seen_from", [seen, g.shared_const("mask/key_axis", 3, np.int32)], [[B, 1, Q, T]],
                 dtype=_INT32, reverse=1)
    near = g.op("LessOrEqual", n + "/near", [later, g.const(n + "/size", window, np.int32)], [[B, 1, Q, T]],
                dtype=_BOOL)
    local = g.op("And", n + "/mask", [mask, near], [[B, 1, Q, T]], dtype=_BOOL)
    return g.op("Where", n + "/bias", [local, "mask/open", "mask/shut"], [[B, 1, Q, T]])


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


def _rotary_tables(g: GraphBuilder, dims: Dims, inv_freq: np.ndarray, keys: str, suffix: str = ""
                   ) -> tuple[str, str, bool]:
    """cos/sin of [max_position_embeddings, head_dim / 2], computed in float64 from the model's own
    inv_freq, so they also survive an fp16 graph (attention wants them in its own type) without the
    phase error of computing angles in fp16.

    GroupQueryAttention's own rotary needs head_dim % 16 == 0 (every released Llama-family model);
    narrower heads (tiny test models) rotate in RotaryEmbedding nodes first: the same numbers.
    Attention wants tables at least as long as the keys (past + new), and an EPIC token tree or a
    packed lookahead row holds more keys than max_position_embeddings while no position reaches it
    (siblings share positions). It reads the tables only at position_ids (< max positions, <= the
    key index), so the rows 0 .. keys-1 of the tables (clipped to the last) serve: a gather of
    keys x head_dim/2 per call, once for all layers."""
    max_pos, half = dims.max_positions, dims.head_dim // 2
    angles = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    cos = g.const(f"rotary{suffix}.cos", np.cos(angles), np.float32)
    sin = g.const(f"rotary{suffix}.sin", np.sin(angles), np.float32)
    fused = dims.head_dim % 16 == 0
    if fused:
        rows = "rotary/rows"
        if not suffix:
            g.op("Min", rows, [keys, g.const("rotary/last_row", max_pos - 1, np.int64)], [[TOTAL]], dtype=_INT64,
                 outputs=[rows])
        cos = g.op("Gather", f"rotary{suffix}/cos_rows", [cos, rows], [[TOTAL, half]])
        sin = g.op("Gather", f"rotary{suffix}/sin_rows", [sin, rows], [[TOTAL, half]])
    return cos, sin, fused


def inv_freq(hf_model: Any, config: Any, head_dim: int, module: str = "rotary_emb", base: float | None = None
             ) -> np.ndarray:
    """The model's own inverse frequencies (transformers computes them in float32): the buffer of
    its rotary module `module` (Gemma 3's local layers: rotary_emb_local), else computed from
    `base` (default rope_theta)."""
    rotary = getattr(getattr(hf_model, "model", None), module, None)
    buf = getattr(rotary, "inv_freq", None)
    if buf is not None and getattr(rotary, "attention_scaling", 1.0) == 1.0:
        return buf.detach().to("cpu").float().numpy()
    theta = np.float32(base if base is not None else getattr(config, "rope_theta", 10000.0))
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))).astype(np.float32)


def inv_freqs(hf_model: Any, config: Any, head_dim: int, local_base: float | None) -> dict[str, np.ndarray]:
    """{GLOBAL: rope_theta's}, plus {LOCAL: ...} when the sliding-window layers have a base of their own."""
    out = {GLOBAL: inv_freq(hf_model, config, head_dim)}
    if local_base is not None:
        out[LOCAL] = inv_freq(hf_model, config, head_dim, "rotary_emb_local", local_base)
    return out
