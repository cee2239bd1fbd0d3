"""Hugging Face -> ONNX export (needs the `export` extra: torch, transformers, optimum)."""

from .exporter import ALIASES, alias_names, export, resolve_source

__all__ = ["ALIASES", "alias_names", "export", "resolve_source"]
