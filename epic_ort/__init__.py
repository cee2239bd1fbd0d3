"""epic-ort: entropy-aligned decoding (EPIC) for decoder-only LMs on ONNX Runtime.

The runtime needs only onnxruntime, numpy and tokenizers; torch/transformers/optimum are
imported only by `epic_ort.export`.
"""

from .errors import (
    CalibrationError,
    EpicOrtError,
    ExportError,
    InvalidRequestError,
    ModelLoadError,
    NumericalError,
)
from .calibration.store import resolve_alpha
from .decoding import Sample, generate
from .settings import GenerationConfig
from .runtime.model import CausalLM, KVCache, load

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CausalLM",
    "EpicOrtError",
    "ExportError",
    "GenerationConfig",
    "InvalidRequestError",
    "KVCache",
    "ModelLoadError",
    "NumericalError",
    "Sample",
    "generate",
    "load",
    "resolve_alpha",
]
