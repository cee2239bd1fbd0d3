"""ONNX Runtime session, tokenizer, manifest and KV cache of an exported model."""

from .model import CausalLM, KVCache, load

__all__ = ["CausalLM", "KVCache", "load"]
