"""What the runtime reads off an exported graph: its inputs, outputs, cache layout and dtypes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelLoadError

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Model metadata of graphs whose attention writes the new keys/values into the past buffers
# themselves when the present outputs are bound to them (ORT's GroupQueryAttention): the cache
# is then one set of buffers, appended in place, instead of a new concatenated copy per step.
KV_CACHE_KEY, KV_CACHE_SHARED = "epic_ort.kv_cache", "shared_buffer"


@dataclass(frozen=True)
class GraphSpec:
    """What the runtime needs to know about the graph's inputs and outputs, read from the graph."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    logits: str
    logits_index: str | None  # lean graphs: which positions get logits (flat row * T + position)
    logits_to_keep: str | None  # lean graphs exported before logits_index: trailing positions with logits
    tree_mask: str | None  # lean graphs only: which keys each new token sees (token trees for EPIC)
    shared_kv: bool  # lean graphs only: past and present may be one buffer, written in place
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None
    kv_dtype: Any
    logits_dtype: Any

    @classmethod
    def from_session(cls, session: Any) -> "GraphSpec":
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise ModelLoadError("model.onnx has no input_ids/logits: not a causal LM export")
        past = tuple(sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order))
        present = tuple(sorted((n for n in outputs if n.startswith("present.")), key=_kv_order))
        if not past or len(past) != len(present):
            raise ModelLoadError(
                "model.onnx has no KV-cache inputs/outputs; export with task text-generation-with-past "
                "(`epic-ort export` does this)"
            )
        shape = inputs[past[0]].shape
        heads, head_dim = shape[1], shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ModelLoadError(f"cannot read KV heads/head size from the graph (past shape {shape})")
        vocab = outputs["logits"].shape[-1]
        return cls(
            input_ids="input_ids",
            attention_mask="attention_mask" if "attention_mask" in inputs else None,
            position_ids="position_ids" if "position_ids" in inputs else None,
            past_names=past,
            present_names=present,
            logits="logits",
            logits_index="logits_index" if "logits_index" in inputs else None,
            logits_to_keep="logits_to_keep" if "logits_to_keep" in inputs else None,
            tree_mask="tree_mask" if "tree_mask" in inputs else None,
            shared_kv=session.get_modelmeta().custom_metadata_map.get(KV_CACHE_KEY) == KV_CACHE_SHARED,
            num_layers=len(past) // 2,
            num_kv_heads=heads,
            head_dim=head_dim,
            vocab_size=vocab if isinstance(vocab, int) else None,
            kv_dtype=_ORT_FLOAT.get(inputs[past[0]].type, np.float32),
            logits_dtype=_ORT_FLOAT.get(outputs["logits"].type, np.float32),
        )


def _kv_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[-2]), 0 if parts[-1] == "key" else 1
