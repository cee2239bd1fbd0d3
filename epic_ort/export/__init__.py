"""Hugging Face -> ONNX export (needs the `export` extra: torch, transformers, optimum)."""

from .exporter import ALIASES, export, resolve_source

__all__ = ["ALIASES", "export", "resolve_source"]
