"""The lean graph's per-layer nodes, its head and its inputs/outputs.

A layer (opset 23):

    SkipSimplifiedLayerNormalization (residual add + RMSNorm, com.microsoft; RMSNormalization for layer 0)
    MatMul [q|k|v] (+ Add bias)
    GroupQueryAttention (com.microsoft) on the packed q|k|v: rotary of q and k at position_ids
               (heads narrower than 16, or a per-head q/k norm, get Split first; narrow heads also
               RotaryEmbedding nodes), then attention with the prelude's additive bias
    MatMul o (+ Add bias) (-> RMSNormalization: Gemma 3's post-attention norm) -> SkipSimplifiedLayerNormalization
    MatMul [gate|up] -> Split -> Sigmoid -> Mul (SiLU; or one Gelu) -> Mul -> MatMul down
               (-> RMSNormalization: Gemma 3's post-feedforward norm)

The residual add after the MLP is fused into the next layer's input norm (or the final norm).
Sliding-window layers read their window's attention bias and, where the model has one, their
own rotary tables (prelude.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..packing import pack_eight_bit
from .architectures import Architecture, Dims
from .graph import BATCH, CAPACITY, LOGITS, MS_DOMAIN, PRESENT, SEQ, TOTAL, GraphBuilder
from .prelude import GLOBAL, LOCAL, Prelude
from .projection import Projector

_FLOAT, _INT64, _BOOL = 1, 7, 9  # onnx.TensorProto element types
# transformers' hidden_act names -> Gelu's `approximate` (opset 20); "silu" is Sigmoid and Mul
ACTIVATIONS = {"silu": None, "gelu": "none", "gelu_pytorch_tanh": "tanh"}


@dataclass(frozen=True)
class Layers:
    """What every builder below reads: the graph being written, the model's weights as NumPy
    arrays, its table entry and sizes, the options its config settles (q/k/v and o biases, the
    MLP activation, the embedding scale, the attention scale, each layer's window, the
    soft-caps), and the products."""

    g: GraphBuilder
    w: dict[str, np.ndarray]
    arch: Architecture
    dims: Dims
    qkv_bias: bool
    o_bias: bool
    activation: str
    embedding_scale: float | None
    project: Projector
    attention_scale: float | None = None
    windows: tuple[int | None, ...] = ()
    attention_softcap: float | None = None
    logit_softcap: float | None = None

    def window(self, i: int) -> int | None:
        return self.windows[i] if self.windows else None

    def weight(self, name: str) -> str:
        """The state-dict tensor `name` as an initializer of the same name."""
        return self.g.const(name, self.w[name])

    def norm_weight(self, name: str) -> str:
        """The RMSNorm scale stored as `name` (plus the architecture's norm_offset)."""
        offset = self.arch.norm_offset
        return self.g.const(name, self.w[name] + np.float32(offset)) if offset else self.weight(name)


def embed(b: Layers) -> tuple[str, str]:
    """(layer 0's normed input, the residual stream): the token embeddings, RMS-normed."""
    names, d = b.arch.names, b.dims
    bse = [BATCH, SEQ, d.hidden]
    h = b.g.op("Gather", "embed", [b.weight(names.embed), "input_ids"], [bse])
    if b.embedding_scale is not None:
        h = b.g.op("Mul", "embed/scale", [h, b.g.const("embed/scale_factor", b.embedding_scale, np.float32)], [bse])
    gamma = b.norm_weight(names.of_layer(0, names.input_norm))
    return b.g.op("RMSNormalization", "layers.0/input_norm", [h, gamma], [bse], axis=-1, epsilon=d.eps), h


def rms_norm(b: Layers, name: str, x: str, gamma: str) -> str:
    """RMSNorm(x) on its own (Gemma 3's norms of the attention and MLP outputs)."""
    bse = [BATCH, SEQ, b.dims.hidden]
    return b.g.op("RMSNormalization", name, [x, b.norm_weight(gamma)], [bse], axis=-1, epsilon=b.dims.eps)


def skip_norm(b: Layers, name: str, x: str, residual: str, gamma: str) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual) in one node."""
    bse = [BATCH, SEQ, b.dims.hidden]
    out = b.g.op("SkipSimplifiedLayerNormalization", name, [x, residual, b.norm_weight(gamma)], [bse, None, None, bse],
                 domain=MS_DOMAIN, epsilon=b.dims.eps)
    return out[0], out[3]


def decoder_layer(b: Layers, pre: Prelude, i: int, normed: str, h: str) -> tuple[str, str]:
    """Layer i from its normed input and the residual stream. Returns (the MLP's output, the
    residual stream), which the next norm adds."""
    names = b.arch.names
    attn = attention(b, pre, i, normed)
    o_bias = [names.of_layer(i, names.o + ".bias")] if b.o_bias else None
    o = b.project(f"layers.{i}/o_proj", attn, [names.of_layer(i, names.o + ".weight")],
                  names.of_layer(i, names.o + ".weight"), o_bias)
    if names.post_attn_norm:
        o = rms_norm(b, f"layers.{i}/attention_out_norm", o, names.of_layer(i, names.post_attn_norm))
    normed, h = skip_norm(b, f"layers.{i}/post_attention_norm", o, h, names.of_layer(i, names.pre_mlp_norm))
    out = mlp(b, i, normed)
    if names.post_mlp_norm:
        out = rms_norm(b, f"layers.{i}/mlp_out_norm", out, names.of_layer(i, names.post_mlp_norm))
    return out, h


def attention(b: Layers, pre: Prelude, i: int, normed: str) -> str:
    """GroupQueryAttention of layer i, writing present.{i}.key/value. Packed q|k|v when attention
    rotates them itself and nothing else touches q or k: no Split and no RotaryEmbedding nodes
    run per step."""
    g, d, names, n = b.g, b.dims, b.arch.names, f"layers.{i}/"
    window = b.window(i)
    cos, sin = pre.rotary[LOCAL if window is not None and LOCAL in pre.rotary else GLOBAL]
    proj = [names.of_layer(i, names.q), names.of_layer(i, names.k), names.of_layer(i, names.v)]
    biases = [p + ".bias" for p in proj] if b.qkv_bias else None
    qkv = b.project(n + "qkv_proj", normed, [p + ".weight" for p in proj],
                    names.of_layer(i, names.qkv + ".weight"), biases)
    if pre.fused_rotary and not b.arch.qk_norm:
        qkv_in = [qkv, "", ""]
    else:
        sizes = g.const(n + "qkv_sizes", [d.q_size, d.kv_size, d.kv_size], np.int64)
        q, k, v = g.op("Split", n + "split_qkv", [qkv, sizes],
                       [[BATCH, SEQ, d.q_size], [BATCH, SEQ, d.kv_size], [BATCH, SEQ, d.kv_size]], axis=-1)
        if b.arch.qk_norm:
            q = head_norm(b, n + "q_norm", q, d.heads, names.of_layer(i, names.q_norm))
            k = head_norm(b, n + "k_norm", k, d.kv_heads, names.of_layer(i, names.k_norm))
        if not pre.fused_rotary:
            q = g.op("RotaryEmbedding", n + "rotary_q", [q, cos, sin, "position_ids"],
                     [[BATCH, SEQ, d.q_size]], num_heads=d.heads)
            k = g.op("RotaryEmbedding", n + "rotary_k", [k, cos, sin, "position_ids"],
                     [[BATCH, SEQ, d.kv_size]], num_heads=d.kv_heads)
        qkv_in = [q, k, v]
    rotary_in = [cos, sin, "position_ids"] if pre.fused_rotary else ["", "", ""]
    kv_shape = [BATCH, d.kv_heads, PRESENT, d.head_dim]
    scale = b.attention_scale if b.attention_scale is not None else float(d.head_dim) ** -0.5
    # GroupQueryAttention caps the scaled scores before adding the bias, as transformers does
    capping = {"softcap": float(b.attention_softcap)} if b.attention_softcap else {}
    return g.op("GroupQueryAttention", n + "attention",
                [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", pre.seqlens_k, pre.total_len,
                 *rotary_in, pre.bias_for(window), "", "", "", "", "", pre.query_lens],
                [[BATCH, SEQ, d.q_size], kv_shape, kv_shape],
                outputs=[n + "attention/out0", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
                num_heads=d.heads, kv_num_heads=d.kv_heads, scale=float(scale), do_rotary=int(pre.fused_rotary),
                **capping)[0]


def head_norm(b: Layers, name: str, x: str, heads: int, gamma: str) -> str:
    """RMSNorm over each head of x [B, S, heads * head_dim] (Qwen3's q_norm / k_norm)."""
    g, hd = b.g, b.dims.head_dim
    split = g.op("Reshape", name + "/heads", [x, g.shared_const(f"shape/heads_{heads}", [0, 0, heads, hd])],
                 [[BATCH, SEQ, heads, hd]])
    normed = g.op("RMSNormalization", name, [split, b.norm_weight(gamma)], [[BATCH, SEQ, heads, hd]], axis=-1,
                  epsilon=b.dims.eps)
    return g.op("Reshape", name + "/merge", [normed, g.shared_const(f"shape/merged_{heads}", [0, 0, heads * hd])],
                [[BATCH, SEQ, heads * hd]])


def mlp(b: Layers, i: int, normed: str) -> str:
    """down(act(gate(x)) * up(x)), gate and up as one product."""
    g, names, n = b.g, b.arch.names, f"layers.{i}/"
    inner = [BATCH, SEQ, b.dims.intermediate]
    gu = b.project(n + "gate_up_proj", normed,
                   [names.of_layer(i, names.gate + ".weight"), names.of_layer(i, names.up + ".weight")],
                   names.of_layer(i, names.gate_up + ".weight"))
    gate, up = g.op("Split", n + "split_gate_up", [gu], [inner] * 2, axis=-1, num_outputs=2)
    approximate = ACTIVATIONS[b.activation]
    if approximate is None:
        act = g.op("Mul", n + "silu", [gate, g.op("Sigmoid", n + "sigmoid", [gate], [inner])], [inner])
    else:
        act = g.op("Gelu", n + "gelu", [gate], [inner], approximate=approximate)
    gated = g.op("Mul", n + "gated", [act, up], [inner])
    down = names.of_layer(i, names.down + ".weight")
    return b.project(n + "down_proj", gated, [down], down)


def lm_head(b: Layers, normed: str, tied: bool) -> None:
    """Only the positions listed in `logits_index` reach the lm_head: a prefill of 8 x 512 tokens
    would otherwise compute (and hold) 8 x 512 x vocab logits to use 8 rows, and EPIC's token
    trees would pay for the padding of their narrower rows. A tied lm_head reads the embedding
    matrix [vocab, hidden] transposed (com.microsoft FusedMatMul, transB=1): stored once. With int8
    compute of either kind, a tied head whose embedding is exact Q8_0 blocks is 8-bit MatMulNBits
    with int8 dot products (activations rounded per block of 32, not per token: projection.py)."""
    g, d, names = b.g, b.dims, b.arch.names
    flat = g.op("Reshape", "lm_head/flatten", [normed, g.const("lm_head/rows_hidden", [-1, d.hidden], np.int64)],
                [[f"{BATCH} * {SEQ}", d.hidden]])
    picked = g.op("Gather", "lm_head/pick", [flat, "logits_index"], [[LOGITS, d.hidden]], axis=0)
    final = "logits" if g.float_elem == _FLOAT else "lm_head/logits"  # fp16 graphs: cast to float32 below
    out = "lm_head/uncapped" if b.logit_softcap else final
    int8 = b.project.int8_compute or b.project.int8_gemm
    eight = pack_eight_bit(b.w[names.embed]) if tied and int8 else None
    if eight is not None:  # the embedding's own Q8_0 blocks (a quarter of the bytes) with int8 dot products
        b.project.eight_bit("lm_head", picked, names.embed, eight, [LOGITS, d.vocab], output=out, accuracy_level=4)
    elif tied:
        g.op("FusedMatMul", "lm_head", [picked, names.embed], [[LOGITS, d.vocab]], outputs=[out],
             domain=MS_DOMAIN, transA=0, transB=1, alpha=1.0)
    else:
        g.op("MatMul", "lm_head", [picked, g.const(names.lm_head, b.w[names.lm_head].T)], [[LOGITS, d.vocab]],
             outputs=[out])
    if b.logit_softcap:  # cap * tanh(logits / cap), as transformers' final_logit_softcapping
        cap = g.const("lm_head/softcap", b.logit_softcap, np.float32)
        scaled = g.op("Div", "lm_head/softcap_div", [out, cap], [[LOGITS, d.vocab]])
        capped = g.op("Tanh", "lm_head/softcap_tanh", [scaled], [[LOGITS, d.vocab]])
        g.op("Mul", "lm_head/softcap_mul", [capped, cap], [[LOGITS, d.vocab]], outputs=[final])
    if final != "logits":
        g.op("Cast", "lm_head/float32", [final], [[LOGITS, d.vocab]], outputs=["logits"], dtype=_FLOAT, to=_FLOAT)


def declare_io(dims: Dims, kv_type: int = _FLOAT) -> tuple[list[Any], list[Any]]:
    """The graph's inputs and outputs: Optimum's text-generation-with-past names, plus
    logits_index and tree_mask. `kv_type`: the cache's element type (the graph's float type);
    the logits are float32 in every graph, so the runtime never converts them."""
    from onnx import helper

    def io(name: str, elem: int, shape: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, elem, shape)

    B, S, T = BATCH, SEQ, TOTAL
    inputs = [io("input_ids", _INT64, [B, S]), io("attention_mask", _INT64, [B, T]), io("position_ids", _INT64, [B, S]),
              io("logits_index", _INT64, [LOGITS]),
              io("tree_mask", _BOOL, ["tree_batch", "tree_queries", "tree_keys"])]
    outputs = [io("logits", _FLOAT, [LOGITS, dims.vocab])]
    for i in range(dims.layers):
        for kind in ("key", "value"):
            inputs.append(io(f"past_key_values.{i}.{kind}", kv_type, [B, dims.kv_heads, CAPACITY, dims.head_dim]))
            outputs.append(io(f"present.{i}.{kind}", kv_type, [B, dims.kv_heads, PRESENT, dims.head_dim]))
    return inputs, outputs
