"""The lean graph's former home, kept so that `from epic_ort.export.llama_graph import ...` keeps
working; the builder now lives in epic_ort/export/lean/ and writes every architecture of its
table, not only Llama's."""

from .lean import MASKED_SCORE, MS_DOMAIN, OPSET, build_lean_onnx, supports

build_llama_onnx = build_lean_onnx

__all__ = ["MASKED_SCORE", "MS_DOMAIN", "OPSET", "build_llama_onnx", "supports"]
