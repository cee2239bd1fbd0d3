"""`build_lean_onnx`: a transformers causal LM -> the lean ONNX graph, from its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .architectures import Dims, architecture_of, supports
from .graph import FLOAT_TYPES, OPSET, GraphBuilder, check, save
from .layers import Layers, declare_io, decoder_layer, embed, lm_head, skip_norm
from .prelude import build_prelude, inv_freqs
from .projection import Projector

from ...runtime.graph import KV_CACHE_KEY, KV_CACHE_SHARED  # the runtime's metadata contract


def build_lean_onnx(hf_model: Any, path: Path, opset: int = OPSET, pack_weights: bool = True,
                    compute: str = "fp32", dtype: str = "fp32", peaks: dict[str, np.ndarray] | None = None) -> int:
    """Write `hf_model` (a transformers causal LM that `supports()` accepts, float32 or castable)
    as one lean ONNX graph at `path`, with the inputs/outputs of Optimum's
    text-generation-with-past export plus logits_index and tree_mask.

    Weights go into the file itself, or into `path.name + ".data"` beside it when they would pass
    protobuf's 2 GB limit. The graph is checked with onnx.checker before it is written.

    pack_weights: keep weights that are exactly 4-bit blocks as 4-bit (lossless, see packing.py).
    compute: "fp32"; "int8" multiplies those (and exact Q8_0 weights, a tied lm_head included) with
    int8 dot products; "int8-gemm" runs every decoder product as int8 GEMM (projection.py), smoothed
    where `peaks` (smoothing.activation_peaks) has its input's activation peaks.
    dtype: "fp32", or "fp16" for GPUs: weights, activations and KV cache in float16, written as such
    (not converted afterwards), logits float32. Returns how many products were packed."""
    import onnx

    config = hf_model.config
    why = supports(config)
    if why:
        raise ValueError(f"cannot build a lean graph: {why}")
    if opset < OPSET or onnx.defs.onnx_opset_version() < opset:
        raise ValueError(f"the lean graph needs opset >= {OPSET} (RMSNormalization); "
                         f"this onnx {onnx.__version__} knows up to {onnx.defs.onnx_opset_version()}")
    if dtype not in FLOAT_TYPES:
        raise ValueError(f"dtype must be one of {tuple(FLOAT_TYPES)}")
    if compute != "fp32" and dtype != "fp32":
        raise ValueError("int8 compute quantizes float32 activations; it needs dtype fp32")
    path = Path(path)
    arch = architecture_of(config)
    w = _numpy_weights(hf_model)
    names = arch.names
    dims = Dims.of(config, w[names.embed].shape)
    g = GraphBuilder(FLOAT_TYPES[dtype])
    windows = arch.windows(config) if arch.windowed else ()
    attention_cap, logit_cap = arch.softcapping(config)
    b = Layers(g, w, arch, dims, qkv_bias=arch.qkv_bias(config), o_bias=arch.o_bias(config),
               activation=arch.activation(config),
               embedding_scale=arch.embedding_scale(config) if arch.embedding_scale else None,
               project=Projector(g, w, pack_weights, compute, peaks), attention_scale=arch.attention_scale(config),
               windows=windows, attention_softcap=attention_cap, logit_softcap=logit_cap)

    local_base = arch.local_rope_base(config) if any(x is not None for x in windows) else None
    if local_base is not None and float(local_base) == float(getattr(config, "rope_theta", 10000.0)):
        local_base = None  # the same tables serve both kinds of layers
    pre = build_prelude(g, dims, inv_freqs(hf_model, config, dims.head_dim, local_base), windows)
    normed, h = embed(b)
    for i in range(dims.layers):
        out, h = decoder_layer(b, pre, i, normed, h)
        last = i == dims.layers - 1
        gamma = names.final_norm if last else names.of_layer(i + 1, names.input_norm)
        normed, h = skip_norm(b, "final_norm" if last else f"layers.{i + 1}/input_norm", out, h, gamma)
    lm_head(b, normed, _is_tied(w, names.embed, names.lm_head))

    inputs, outputs = declare_io(dims, g.float_elem)
    model = g.model(f"epic_ort_lean_{arch.model_type}", inputs, outputs, opset, {KV_CACHE_KEY: KV_CACHE_SHARED})
    check(model, g.weights)
    save(model, g.weights, path)
    return b.project.packed


def _numpy_weights(hf_model: Any) -> dict[str, np.ndarray]:
    """The state dict as float32 NumPy arrays, converted once: nothing after this needs torch."""
    return {k: v.detach().to("cpu").float().numpy() for k, v in hf_model.state_dict().items()}


def _is_tied(w: dict[str, np.ndarray], embed_name: str, head_name: str) -> bool:
    """lm_head is the embedding matrix (tie_word_embeddings, or simply the same values)."""
    head, embedding = w.get(head_name), w[embed_name]
    return head is None or np.shares_memory(head, embedding) or np.array_equal(head, embedding)
