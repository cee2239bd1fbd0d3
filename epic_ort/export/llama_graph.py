"""A lean, hand-built ONNX graph for Llama-family decoder-only models.

Optimum's export of a Llama traces the PyTorch code and leaves ~100 small shape ops per layer
(Shape/Gather/Unsqueeze/Concat/Expand/Where ...) that ONNX Runtime executes on every decoding
step. This module writes the same model directly from its weights, with ~10 nodes per layer.
Its inputs and outputs follow the Optimum export (`text-generation-with-past`), with the KV
cache as buffers that are written in place:

    input_ids       int64 [batch_size, sequence_length]
    attention_mask  int64 [batch_size, past_length + sequence_length]  (1 real, 0 left padding)
    position_ids    int64 [batch_size, sequence_length]
    past_key_values.{i}.key / .value   float [batch_size, kv_heads, capacity, head_dim]
 -> logits          float [logits_count, vocab]
    present.{i}.key / .value           float [batch_size, kv_heads, capacity or past_length + sequence_length, head_dim]

The past tensors may be longer than the past (capacity >= past_length, read from the attention
mask): when the caller binds each present output to its past buffer (IO binding), attention
(com.microsoft GroupQueryAttention) writes the new keys/values into slots past_length ..
past_length + sequence_length - 1 of that buffer and nothing is copied. Unbound, with capacity =
past_length, the present is the concatenation, as in Optimum's graph. The model metadata
`epic_ort.kv_cache = shared_buffer` tells the runtime which contract a graph has.

Two inputs of its own:

    logits_index    int64 [logits_count]: which positions (row x sequence_length + position)
                    reach the lm_head: a prefill needs each row's last, text scoring all, an
                    EPIC token tree its real tokens (not the padding of narrower rows);
    tree_mask       bool [batch_size or 1, sequence_length or 1, past_length + sequence_length or 1]:
                    which keys each new token may see, on top of padding and causality. [1, 1, 1]
                    True is ordinary decoding; EPIC's lookahead runs a token tree through it.

`epic_ort.runtime.model.CausalLM` runs both graphs, and their KV caches are interchangeable
(keys are stored after rotary, as in transformers).

Per layer (opset 23):

    SkipSimplifiedLayerNormalization (residual add + RMSNorm, com.microsoft; RMSNormalization for layer 0)
    MatMul [q|k|v]
    GroupQueryAttention (com.microsoft) on the packed q|k|v: rotary of q and k at position_ids
               (cos/sin tables; heads narrower than 16 get Split + RotaryEmbedding nodes first),
               then attention with an additive bias [batch, 1, seq, past+seq] that
               is 0 where padding AND causal AND tree_mask allow a key and -1e30 elsewhere, so a
               fully masked row is uniform, never NaN
    MatMul o -> SkipSimplifiedLayerNormalization
    MatMul [gate|up] -> Split -> Sigmoid -> Mul -> Mul -> MatMul down

A weight that is exactly 4-bit blocks (a Q4_1 GGUF's, as SmolLM2's) stays 4-bit: its MatMul
becomes MatMulNBits (float32 arithmetic) plus the blocks' offsets (ReduceSum, a small MatMul,
Add); packing.py says why this is lossless. Batch-1 decoding reads 5 bits per weight instead of 32.

The attention bias and GroupQueryAttention's lengths are computed once, at the top; the
rotary tables are initializers of [max_position_embeddings, head_dim / 2] (computed in float64
from the model's own inv_freq, so they also survive an fp16 conversion without the phase error
of computing angles in fp16). A tied lm_head reads the embedding matrix through a transposed
MatMul (com.microsoft FusedMatMul, transB=1), so the matrix is stored once.

Needs only NumPy and `onnx`; the torch model is converted to NumPy arrays right away.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.model import KV_CACHE_KEY, KV_CACHE_SHARED
from .packing import BLOCK, pack_four_bit

OPSET = 23
MS_DOMAIN = "com.microsoft"
_MAX_PROTO_BYTES = 1_800_000_000  # above this the weights go to `<name>.data` (protobuf's limit is 2 GB)
_SUPPORTED_TYPES = {"llama", "mistral"}
MASKED_SCORE = -1e30  # added to a masked key's score: finite, so a fully masked row is uniform, never NaN


def supports(config: Any) -> str | None:
    """None when `config` (a transformers config) can be written by `build_llama_onnx`,
    else a short reason why not."""
    kind = getattr(config, "model_type", None)
    if kind not in _SUPPORTED_TYPES:
        return f"model_type {kind!r} is not a Llama-family model ({', '.join(sorted(_SUPPORTED_TYPES))})"
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (only silu)"
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            return f"{flag}=True (biases are not supported)"
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"
                        and set(scaling) <= {"rope_type", "type"}):
        return f"rope_scaling={scaling} (only plain RoPE is supported)"
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return f"pretraining_tp={config.pretraining_tp} (only 1)"
    if getattr(config, "partial_rotary_factor", 1.0) not in (1, 1.0, None):
        return "partial_rotary_factor != 1"
    window = getattr(config, "sliding_window", None)
    if kind == "mistral" and window is not None and window < config.max_position_embeddings:
        return f"sliding_window={window} is smaller than the context"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        return f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    head_dim = _head_dim(config)
    if head_dim % 2:
        return f"odd head_dim {head_dim}"
    if not getattr(config, "head_dim", None) and config.hidden_size % heads:
        return "hidden_size is not a multiple of num_attention_heads"
    return None


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class _Graph:
    """Nodes, initializers and the type/shape of every intermediate tensor. The shapes go into
    value_info: onnx's shape inference stops at com.microsoft ops, and ORT's quantizer needs the
    element type of every MatMul output."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.weights: list[tuple[str, np.ndarray]] = []
        self.value_info: list[Any] = []

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        self.weights.append((name, np.ascontiguousarray(np.asarray(value, dtype=dtype))))
        return name

    def op(self, op_type: str, name: str, inputs: list[str], shapes: list[Any], outputs: list[str] | None = None,
           dtype: int = 1, domain: str = "", **attrs: Any) -> Any:
        """One node called `name`; `shapes` lists each output's shape (None: optional output left out),
        `dtype` their element type. Returns the output name, or the list of them."""
        outs = outputs or [f"{name}/out{i}" for i in range(len(shapes))]
        outs = [o if shape is not None else "" for o, shape in zip(outs, shapes)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        for o, shape in zip(outs, shapes):
            if o and shape is not None:
                self.value_info.append(self.helper.make_tensor_value_info(o, dtype, shape))
        return outs[0] if len(outs) == 1 else outs


def _numpy_weights(hf_model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().to("cpu").float().numpy() for k, v in hf_model.state_dict().items()}


def _is_tied(w: dict[str, np.ndarray]) -> bool:
    """lm_head is the embedding matrix (tie_word_embeddings, or simply the same values)."""
    head, embed = w.get("lm_head.weight"), w["model.embed_tokens.weight"]
    return head is None or np.shares_memory(head, embed) or np.array_equal(head, embed)


def build_llama_onnx(hf_model: Any, path: Path, opset: int = OPSET, pack_weights: bool = True) -> int:
    """Write `hf_model` (a transformers Llama-family causal LM, float32 or castable) as one lean
    ONNX graph at `path`, with the inputs/outputs of Optimum's text-generation-with-past export.

    Weights go into the file itself, or into `path.name + ".data"` beside it when they would pass
    protobuf's 2 GB limit. The result is checked with onnx.checker.

    pack_weights: keep weights that are exactly 4-bit blocks as 4-bit (lossless, see packing.py).
    Returns how many products were packed."""
    import onnx
    from onnx import TensorProto, helper

    config = hf_model.config
    why = supports(config)
    if why:
        raise ValueError(f"cannot build a lean Llama graph: {why}")
    if opset < OPSET or onnx.defs.onnx_opset_version() < opset:
        raise ValueError(f"the lean Llama graph needs opset >= {OPSET} (RMSNormalization); "
                         f"this onnx {onnx.__version__} knows up to {onnx.defs.onnx_opset_version()}")
    path = Path(path)
    w = _numpy_weights(hf_model)
    tied = _is_tied(w)

    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = _head_dim(config)
    eps = float(config.rms_norm_eps)
    embed = w["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    max_pos = int(config.max_position_embeddings)

    g = _Graph()
    B, S, P, T = "batch_size", "sequence_length", "capacity", "past_length + sequence_length"
    f32, i64, boolean = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    inter = int(config.intermediate_size)
    bse = [B, S, hidden]

    packed_count = 0
    made: set[str] = set()

    def shared_const(name: str, value: list[int]) -> str:
        """An int64 constant the packed products share, written on first use (none when nothing packs:
        ONNX Runtime warns about unused initializers)."""
        if name not in made:
            made.add(name)
            g.const(name, value, np.int64)
        return name

    def project(name: str, x: str, *weights: str) -> str:
        """x @ W.T for nn.Linear weights [out, in] (several: stacked along out, one product).
        A weight that is exactly 4-bit blocks (a Q4_1 GGUF's) stays 4-bit (see packing.py);
        any other is one float32 MatMul operand [in, out]."""
        nonlocal packed_count
        stacked = np.concatenate([w[k] for k in weights], axis=0) if len(weights) > 1 else w[weights[0]]
        key = weights[0].replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj")
        out_features, in_features = stacked.shape
        shape = [B, S, out_features]
        packed = pack_four_bit(stacked) if pack_weights else None
        if packed is None:
            return g.op("MatMul", name, [x, g.const(key, stacked.T)], [shape])
        packed_count += 1
        blocks = in_features // BLOCK
        operands = [x, g.const(key + ".levels", packed.levels), g.const(key + ".scales", packed.scales.reshape(-1))]
        offsets = packed.midpoint_offsets()  # levels read as q - 8 (no zero points: the faster kernel)
        if offsets is None:  # levels read as q, with explicit zero points 0
            offsets = packed.offsets
            operands.append(g.const(key + ".zero_points", np.zeros(out_features * ((blocks + 1) // 2), np.uint8)))
        main = g.op("MatMulNBits", name, operands, [shape], domain=MS_DOMAIN,
                    K=in_features, N=out_features, bits=4, block_size=BLOCK, accuracy_level=0)
        block_shape = shared_const(f"packing/block_shape_{blocks}", [0, 0, blocks, BLOCK])
        grouped = g.op("Reshape", name + "/blocks", [x, block_shape], [[B, S, blocks, BLOCK]])
        sums = g.op("ReduceSum", name + "/block_sums", [grouped, shared_const("packing/last_axis", [-1])],
                    [[B, S, blocks]], keepdims=0)
        shift = g.op("MatMul", name + "/offsets", [sums, g.const(key + ".offsets", offsets.T)], [shape])
        return g.op("Add", name + "/with_offsets", [main, shift], [shape])

    # --- shared by all layers: the attention mask and the rotary tables ------------------------
    # mask[b, 0, s, t] = key t is a real token (attention_mask) AND t is not after query s
    # (causal, offset by the past length) AND tree_mask[b, s, t]. The runtime feeds a [1, 1, 1]
    # True tree_mask for ordinary decoding; EPIC's lookahead feeds a token tree (many candidates
    # and rollouts as positions of one row over one shared prefix, each seeing only its ancestors).
    Q = "sequence_length"
    pad = g.op("Cast", "mask/pad_bool", ["attention_mask"], [[B, T]], dtype=boolean, to=boolean)
    pad = g.op("Unsqueeze", "mask/pad", [pad, g.const("mask/axes_12", [1, 2], np.int64)], [[B, 1, 1, T]],
               dtype=boolean)
    zero, one = g.const("mask/zero", 0, np.int64), g.const("mask/one", 1, np.int64)
    total_1d = g.op("Shape", "mask/total_1d", ["attention_mask"], [[1]], dtype=i64, start=1, end=2)
    total = g.op("Squeeze", "mask/total", [total_1d], [[]], dtype=i64)
    seq = g.op("Squeeze", "mask/seq", [g.op("Shape", "mask/seq_1d", ["input_ids"], [[1]], dtype=i64,
                                              start=1, end=2)], [[]], dtype=i64)
    keys = g.op("Range", "mask/keys", [zero, total, one], [[T]], dtype=i64)
    queries = g.op("Range", "mask/queries", [g.op("Sub", "mask/past", [total, seq], [[]], dtype=i64), total, one],
                   [[Q]], dtype=i64)
    queries = g.op("Unsqueeze", "mask/queries_col", [queries, g.const("mask/axes_1", [1], np.int64)], [[Q, 1]],
                   dtype=i64)
    causal = g.op("LessOrEqual", "mask/causal", [keys, queries], [[Q, T]], dtype=boolean)
    tree = g.op("Unsqueeze", "mask/tree", ["tree_mask", g.const("mask/axes_1b", [1], np.int64)],
                [["tree_batch", 1, "tree_queries", "tree_keys"]], dtype=boolean)
    mask = g.op("And", "mask/pad_causal", [pad, causal], [[B, 1, Q, T]], dtype=boolean)
    mask = g.op("And", "mask/all", [mask, tree], [[B, 1, Q, T]], dtype=boolean)
    bias = g.op("Where", "mask/bias", [mask, g.const("mask/open", 0.0, np.float32),
                                       g.const("mask/shut", MASKED_SCORE, np.float32)], [[B, 1, Q, T]])
    # GroupQueryAttention's lengths: every row has `total` slots (left padding is masked by the bias),
    # so each row's new keys land at slots total - seq ... total - 1 of its cache buffer.
    i32 = TensorProto.INT32
    rows = g.op("Shape", "mask/rows", ["attention_mask"], [[1]], dtype=i64, start=0, end=1)
    total_i32 = g.op("Cast", "mask/total_i32", [total_1d], [[1]], dtype=i32, to=i32)
    total_len = g.op("Squeeze", "mask/total_len", [total_i32], [[]], dtype=i32)
    last = g.op("Sub", "mask/last_slot", [total_i32, g.const("mask/one_i32", [1], np.int32)], [[1]], dtype=i32)
    seqlens_k = g.op("Expand", "mask/seqlens_k", [last, rows], [[B]], dtype=i32)
    seq_i32 = g.op("Cast", "mask/seq_i32", [seq], [[]], dtype=i32, to=i32)
    query_lens = g.op("Expand", "mask/query_lens", [seq_i32, rows], [[B]], dtype=i32)
    inv_freq = _inv_freq(hf_model, config, head_dim)
    angles = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    cos = g.const("rotary.cos", np.cos(angles), np.float32)  # [max_positions, head_dim / 2]
    sin = g.const("rotary.sin", np.sin(angles), np.float32)

    # GroupQueryAttention's own rotary needs head_dim % 16 == 0 (every released Llama-family model);
    # narrower heads (tiny test models) rotate in RotaryEmbedding nodes first: the same numbers
    fused_rotary = head_dim % 16 == 0
    if fused_rotary:
        # GroupQueryAttention wants cos/sin tables at least as long as the keys (past + new), and an
        # EPIC token tree or a packed lookahead row holds more keys than max_position_embeddings
        # while no position reaches it (siblings share positions). It reads the tables only at
        # position_ids (< max positions, <= the key index), so the rows 0 .. keys-1 of the tables
        # (clipped to the last) serve: a gather of keys x head_dim/2 per call, once for all layers.
        table_rows = g.op("Min", "rotary/rows", [keys, g.const("rotary/last_row", max_pos - 1, np.int64)], [[T]],
                          dtype=i64)
        cos = g.op("Gather", "rotary/cos_rows", [cos, table_rows], [[T, head_dim // 2]])
        sin = g.op("Gather", "rotary/sin_rows", [sin, table_rows], [[T, head_dim // 2]])

    g.const("model.embed_tokens.weight", embed)
    h = g.op("Gather", "embed", ["model.embed_tokens.weight", "input_ids"], [bse])
    gamma = g.const("model.layers.0.input_layernorm.weight", w["model.layers.0.input_layernorm.weight"])
    normed = g.op("RMSNormalization", "layers.0/input_norm", [h, gamma], [bse], axis=-1, epsilon=eps)
    for i in range(layers):
        p, n = f"model.layers.{i}.", f"layers.{i}/"
        qkv = project(n + "qkv_proj", normed, *(f"{p}self_attn.{x}_proj.weight" for x in "qkv"))
        if fused_rotary:  # packed [q|k|v], rotated inside attention at position_ids (any positions:
            # left padding, token trees): no Split and no RotaryEmbedding nodes run per step
            qkv_in, rotary_in = [qkv, "", ""], [cos, sin, "position_ids"]
        else:
            sizes = g.const(n + "qkv_sizes", [q_size, kv_size, kv_size], np.int64)
            q, k, v = g.op("Split", n + "split_qkv", [qkv, sizes],
                           [[B, S, q_size], [B, S, kv_size], [B, S, kv_size]], axis=-1)
            q = g.op("RotaryEmbedding", n + "rotary_q", [q, cos, sin, "position_ids"], [[B, S, q_size]],
                     num_heads=heads)
            k = g.op("RotaryEmbedding", n + "rotary_k", [k, cos, sin, "position_ids"], [[B, S, kv_size]],
                     num_heads=kv_heads)
            qkv_in, rotary_in = [q, k, v], ["", "", ""]
        attn = g.op("GroupQueryAttention", n + "attention",
                    [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len,
                     *rotary_in, bias, "", "", "", "", "", query_lens],
                    [[B, S, q_size], [B, kv_heads, "present_length", head_dim],
                     [B, kv_heads, "present_length", head_dim]],
                    outputs=[n + "attention/out0", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
                    num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim) ** -0.5,
                    do_rotary=int(fused_rotary))[0]
        o = project(n + "o_proj", attn, p + "self_attn.o_proj.weight")
        gamma = g.const(p + "post_attention_layernorm.weight", w[p + "post_attention_layernorm.weight"])
        normed, h = g.op("SkipSimplifiedLayerNormalization", n + "post_attention_norm", [o, h, gamma],
                         [bse, None, None, bse], domain=MS_DOMAIN, epsilon=eps)[::3]
        gu = project(n + "gate_up_proj", normed, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        gate, up = g.op("Split", n + "split_gate_up", [gu], [[B, S, inter]] * 2, axis=-1, num_outputs=2)
        act = g.op("Mul", n + "silu", [gate, g.op("Sigmoid", n + "sigmoid", [gate], [[B, S, inter]])], [[B, S, inter]])
        gated = g.op("Mul", n + "gated", [act, up], [[B, S, inter]])
        down = project(n + "down_proj", gated, p + "mlp.down_proj.weight")
        last = i == layers - 1
        name = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
        normed, h = g.op("SkipSimplifiedLayerNormalization", "final_norm" if last else f"layers.{i + 1}/input_norm",
                         [down, h, g.const(name, w[name])], [bse, None, None, bse], domain=MS_DOMAIN, epsilon=eps)[::3]

    # Only the positions listed in `logits_index` reach the lm_head: a prefill of 8 x 512 tokens
    # would otherwise compute (and hold) 8 x 512 x vocab logits to use 8 rows, and EPIC's token
    # trees would pay for the padding of their narrower rows.
    N = "logits_count"
    flat = g.op("Reshape", "lm_head/flatten", [normed, g.const("lm_head/rows_hidden", [-1, hidden], np.int64)],
                [[f"{B} * {S}", hidden]])
    picked = g.op("Gather", "lm_head/pick", [flat, "logits_index"], [[N, hidden]], axis=0)
    if tied:  # the embedding matrix [vocab, hidden] read transposed: stored once
        g.op("FusedMatMul", "lm_head", [picked, "model.embed_tokens.weight"], [[N, vocab]], outputs=["logits"],
             domain=MS_DOMAIN, transA=0, transB=1, alpha=1.0)
    else:
        g.op("MatMul", "lm_head", [picked, g.const("lm_head.weight", w["lm_head.weight"].T)], [[N, vocab]],
             outputs=["logits"])

    def io(name: str, elem: int, dims: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [io("input_ids", i64, [B, S]), io("attention_mask", i64, [B, T]), io("position_ids", i64, [B, S]),
              io("logits_index", i64, [N]), io("tree_mask", boolean, ["tree_batch", "tree_queries", "tree_keys"])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(io(f"past_key_values.{i}.{kind}", f32, [B, kv_heads, P, head_dim]))
    outputs = [io("logits", f32, [N, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            outputs.append(io(f"present.{i}.{kind}", f32, [B, kv_heads, "present_length", head_dim]))

    io_names = {v.name for v in inputs + outputs}
    graph = helper.make_graph(g.nodes, "epic_ort_lean_llama", inputs, outputs,
                              value_info=[v for v in g.value_info if v.name not in io_names])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="epic_ort.export.llama_graph",
    )
    helper.set_model_props(model, {KV_CACHE_KEY: KV_CACHE_SHARED})
    _save(model, g.weights, path)
    onnx.checker.check_model(str(path))
    return packed_count


def _inv_freq(hf_model: Any, config: Any, head_dim: int) -> np.ndarray:
    """The model's own inverse frequencies (transformers computes them in float32)."""
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    buf = getattr(rotary, "inv_freq", None)
    if buf is not None and getattr(rotary, "attention_scaling", 1.0) == 1.0:
        return buf.detach().to("cpu").float().numpy()
    theta = np.float32(getattr(config, "rope_theta", 10000.0))
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))).astype(np.float32)


def _save(model: Any, weights: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Attach the initializers and write the file; over ~1.8 GB of weights they go to one external
    data file beside it (aligned, as onnx's own external-data writer does)."""
    import onnx
    from onnx import numpy_helper

    path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(a.nbytes for _, a in weights)
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if total <= _MAX_PROTO_BYTES:
        if data_path.exists():
            data_path.unlink()
        model.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in weights)
        onnx.save_model(model, str(path))
        return
    offset = 0
    with open(data_path, "wb") as f:
        for name, a in weights:
            if a.nbytes < 1024:
                model.graph.initializer.append(numpy_helper.from_array(a, name))
                continue
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(a.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            f.write(a.tobytes())
            offset += a.nbytes
            model.graph.initializer.append(t)
        f.flush()
        os.fsync(f.fileno())
    onnx.save_model(model, str(path))
