"""Which transformers models the lean graph can write, and how each one differs from Llama.

The lean graph is one decoder recipe (RMSNorm, rotary attention with GroupQueryAttention, a gated
MLP); architectures differ in where their weights live and in a handful of switches (Gemma 3 has
the most: sandwich norms, q/k norms, sliding-window layers with their own rotary base, a query
scale of its own). Each
supported `model_type` is one `Architecture` entry in ARCHITECTURES: adding a model that fits the
recipe is an entry (plus a check for whatever its config can switch on that the graph lacks).
`supports()` is the single place that decides, so `--graph auto` and `--graph lean` agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], str | None]  # a transformers config -> None, or why the lean graph cannot write it


@dataclass(frozen=True)
class WeightNames:
    """Where the state dict keeps each tensor. Per-layer names are relative to `layer`
    (formatted with the layer index); projections are module names, read as `.weight`/`.bias`.
    `qkv` and `gate_up` name the fused initializers the graph writes."""

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{i}."
    input_norm: str = "input_layernorm.weight"
    pre_mlp_norm: str = "post_attention_layernorm.weight"
    post_attn_norm: str | None = None  # Gemma 3's sandwich norms: on the attention output, before the residual
    post_mlp_norm: str | None = None  # ... and on the MLP output
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str = "self_attn.qkv_proj"
    q_norm: str = "self_attn.q_norm.weight"
    k_norm: str = "self_attn.k_norm.weight"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    gate_up: str = "mlp.gate_up_proj"

    def of_layer(self, i: int, name: str) -> str:
        return self.layer.format(i=i) + name


def _never(config: Any) -> bool:
    return False


def _no_window(config: Any, layer: int) -> int | None:
    return None


def _no_value(config: Any) -> float | None:
    return None


def _no_caps(config: Any) -> tuple[float | None, float | None]:
    return None, None


@dataclass(frozen=True)
class Architecture:
    """How one model_type maps onto the lean recipe.

    qkv_bias / o_bias: config -> whether those projections add a bias (read from the weights).
    qk_norm: RMSNorm over each head of q and k (weights of head_dim) before rotary, as Qwen3.
    activations: the config hidden_act values the gated MLP may name (layers.ACTIVATIONS has them all).
    norm_offset: what the stored RMSNorm weights lack: Gemma stores w and scales by 1 + w.
    embedding_scale: config -> the factor on the input embeddings (Gemma: sqrt(hidden_size)), or
        None; a tied lm_head still reads the unscaled matrix.
    sliding_window: (config, layer) -> the key window that layer's attention uses, or None.
    windowed: the graph applies those windows (prelude.py: in the attention bias, by position, so
        that they also hold in EPIC's token trees). Without it the graph attends to every key and
        supports() refuses a window shorter than the context.
    activation_key: the config attribute naming the MLP activation (Gemma 3: hidden_activation).
    attention_scale: config -> the factor on q.k (Gemma 3: query_pre_attn_scalar ** -0.5); None is
        head_dim ** -0.5.
    local_rope_base: config -> the rotary base of the sliding-window layers when it differs from
        rope_theta (Gemma 3: rope_local_base_freq), or None.
    softcapping: config -> (attention score cap, final logit cap), each None when off: scores
        become cap * tanh(score / cap) (Gemma 2/3's attn_logit_softcapping, final_logit_softcapping).
    checks: what else the config must satisfy, beyond COMMON_CHECKS."""

    model_type: str
    names: WeightNames = field(default_factory=WeightNames)
    qkv_bias: Callable[[Any], bool] = _never
    o_bias: Callable[[Any], bool] = _never
    qk_norm: bool = False
    activations: tuple[str, ...] = ("silu",)
    norm_offset: float = 0.0
    embedding_scale: Callable[[Any], float] | None = None
    sliding_window: Callable[[Any, int], int | None] = _no_window
    windowed: bool = False
    activation_key: str = "hidden_act"
    attention_scale: Callable[[Any], float | None] = _no_value
    local_rope_base: Callable[[Any], float | None] = _no_value
    softcapping: Callable[[Any], tuple[float | None, float | None]] = _no_caps
    checks: tuple[Check, ...] = ()

    def activation(self, config: Any) -> str:
        return getattr(config, self.activation_key, None) or self.activations[0]

    def windows(self, config: Any) -> tuple[int | None, ...]:
        """Each layer's key window, None where it attends to the whole context (a window that
        covers max_position_embeddings is none)."""
        context = int(config.max_position_embeddings)
        out = []
        for layer in range(int(config.num_hidden_layers)):
            w = self.sliding_window(config, layer)
            out.append(int(w) if w is not None and w < context else None)
        return tuple(out)


def head_dim(config: Any) -> int:
    """Explicit in newer configs (Qwen3's is not hidden_size / heads), else derived."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@dataclass(frozen=True)
class Dims:
    """The sizes the builders need, read once from the config."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    eps: float

    @classmethod
    def of(cls, config: Any, embedding_shape: tuple[int, int]) -> Dims:
        """The vocabulary and hidden sizes come from the embedding matrix itself."""
        heads = int(config.num_attention_heads)
        vocab, hidden = embedding_shape
        return cls(layers=int(config.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=head_dim(config),
                   hidden=int(hidden), intermediate=int(config.intermediate_size), vocab=int(vocab),
                   max_positions=int(config.max_position_embeddings), eps=float(config.rms_norm_eps))

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


def _no_attention_bias(config: Any) -> str | None:
    if getattr(config, "attention_bias", False):
        return "attention_bias=True (biases are not supported)"
    return None


def _no_mlp_bias(config: Any) -> str | None:
    if getattr(config, "mlp_bias", False):
        return "mlp_bias=True (biases are not supported)"
    return None


def _plain_rope(config: Any) -> str | None:
    scaling = getattr(config, "rope_scaling", None)
    if scaling and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"
                        and set(scaling) <= {"rope_type", "type"}):
        return f"rope_scaling={scaling} (only plain RoPE is supported)"
    if getattr(config, "partial_rotary_factor", 1.0) not in (1, 1.0, None):
        return "partial_rotary_factor != 1"
    return None


def _no_tensor_parallel_slices(config: Any) -> str | None:
    if getattr(config, "pretraining_tp", 1) not in (1, None):
        return f"pretraining_tp={config.pretraining_tp} (only 1)"
    return None


def _head_layout(config: Any) -> str | None:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        return f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    if head_dim(config) % 2:
        return f"odd head_dim {head_dim(config)}"
    if not getattr(config, "head_dim", None) and config.hidden_size % heads:
        return "hidden_size is not a multiple of num_attention_heads"
    return None


COMMON_CHECKS: tuple[Check, ...] = (_no_mlp_bias, _plain_rope, _no_tensor_parallel_slices, _head_layout)


def _mistral_window(config: Any, layer: int) -> int | None:
    return getattr(config, "sliding_window", None)


def _qwen_window(config: Any, layer: int) -> int | None:
    """As transformers' Qwen2/Qwen3 attention: the window of layers typed "sliding_attention"
    (configs without layer_types: use_sliding_window and layer >= max_window_layers)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", False):
        return None
    types = getattr(config, "layer_types", None)
    if types:
        return window if types[layer] == "sliding_attention" else None
    return window if layer >= getattr(config, "max_window_layers", 0) else None


def _always(config: Any) -> bool:
    return True


def _attention_bias(config: Any) -> bool:
    return bool(getattr(config, "attention_bias", False))


def _sqrt_hidden(config: Any) -> float:
    return float(config.hidden_size) ** 0.5


def _gemma3_window(config: Any, layer: int) -> int | None:
    """As transformers' Gemma3Attention: the window of layers typed "sliding_attention" (configs
    without layer_types: every layer but each sliding_window_pattern-th)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        sliding = types[layer] == "sliding_attention"
    else:
        pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", 6)
        sliding = bool((layer + 1) % pattern)
    return window if sliding else None


def _query_pre_attn_scalar(config: Any) -> float:
    return float(config.query_pre_attn_scalar) ** -0.5


def _rope_local_base(config: Any) -> float | None:
    return getattr(config, "rope_local_base_freq", None)


def _softcaps(config: Any) -> tuple[float | None, float | None]:
    return (getattr(config, "attn_logit_softcapping", None) or None,
            getattr(config, "final_logit_softcapping", None) or None)


def _causal(config: Any) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "use_bidirectional_attention=True (only causal attention)"
    return None


def _no_gemma3_attention_cap(config: Any) -> str | None:
    """transformers' Gemma3Attention never passes attn_logit_softcapping to its attention (4.57):
    a config that sets it has no reference computation to match (Optimum's export traces what
    transformers does)."""
    if getattr(config, "attn_logit_softcapping", None):
        return "attn_logit_softcapping is set (transformers' Gemma 3 does not apply it)"
    return None


GEMMA3_NAMES = WeightNames(pre_mlp_norm="pre_feedforward_layernorm.weight",
                           post_attn_norm="post_attention_layernorm.weight",
                           post_mlp_norm="post_feedforward_layernorm.weight")


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", checks=(_no_attention_bias,)),
    "mistral": Architecture("mistral", sliding_window=_mistral_window, checks=(_no_attention_bias,)),
    "qwen2": Architecture("qwen2", qkv_bias=_always, sliding_window=_qwen_window),  # Qwen2, Qwen2.5
    "qwen3": Architecture("qwen3", qkv_bias=_attention_bias, o_bias=_attention_bias, qk_norm=True,
                          sliding_window=_qwen_window),
    "gemma": Architecture("gemma", qkv_bias=_attention_bias, o_bias=_attention_bias,
                          activations=("gelu_pytorch_tanh", "gelu"), norm_offset=1.0, embedding_scale=_sqrt_hidden),
    # Gemma 3 (text: Gemma3ForCausalLM, what its GGUF files load as): sandwich norms, q/k norms,
    # sliding-window layers with their own rotary base, query_pre_attn_scalar, optional soft-capping
    "gemma3_text": Architecture("gemma3_text", names=GEMMA3_NAMES, qkv_bias=_attention_bias, o_bias=_attention_bias,
                                qk_norm=True, activations=("gelu_pytorch_tanh", "gelu"),
                                activation_key="hidden_activation", norm_offset=1.0, embedding_scale=_sqrt_hidden,
                                sliding_window=_gemma3_window, windowed=True, attention_scale=_query_pre_attn_scalar,
                                local_rope_base=_rope_local_base, softcapping=_softcaps,
                                checks=(_causal, _no_gemma3_attention_cap)),
}


def architecture_of(config: Any) -> Architecture:
    """The table entry for `config`; KeyError names the model_type when there is none."""
    return ARCHITECTURES[getattr(config, "model_type", None)]


def supports(config: Any) -> str | None:
    """None when `config` (a transformers config) can be written as the lean graph, else a short
    reason why not."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model_type {kind!r} is not one the lean graph writes ({', '.join(sorted(ARCHITECTURES))})"
    arch = ARCHITECTURES[kind]
    act = arch.activation(config)
    if act not in arch.activations:
        return f"hidden_act {act!r} (only {', '.join(arch.activations)})"
    for check in arch.checks + COMMON_CHECKS:
        why = check(config)
        if why:
            return why
    if not arch.windowed:
        context = config.max_position_embeddings
        window = next((w for w in arch.windows(config) if w is not None), None)
        if window is not None:
            return f"sliding_window={window} is smaller than the context ({context})"
    return None
