"""The manifest that `epic-ort export` writes beside model.onnx.

It records what the runtime cannot read from the graph itself (where the model came from,
EOS ids, context length, chat template) and a content hash that calibrations are tied to.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

MANIFEST_NAME = "epic_ort_manifest.json"
FORMAT = "epic-ort/1"


@dataclass
class Manifest:
    source: str
    dtype: str
    model_type: str
    input_names: list[str]
    output_names: list[str]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: list[int]
    max_positions: int
    model_sha256: str
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    opset: int | None = None
    chat_template: str | None = None
    quantization: str | None = None
    graph: str = "optimum"  # "lean" (epic-ort's Llama graph) or "optimum"
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_manifest(model_dir: Path) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir} is not an epic-ort export ({MANIFEST_NAME} missing); "
            "create one with `epic-ort export MODEL OUTPUT_DIR`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return Manifest.from_json(data)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{path} is corrupt ({e}); re-export the model with `epic-ort export --force`") from None
