"""Tiny random Llama / GPT-2 models with a character-level tokenizer, built inside the test suite
so that unit tests need no downloads. Exported through epic-ort's own exporter."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = list(string.ascii_lowercase + " .,!?'")


def build_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    fast.save_pretrained(str(folder))
    return fast, len(vocab)


def build_hf_model(kind: str, folder: Path, seed: int = 0, init_range: float = 0.3, max_positions: int = 128):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = build_tokenizer(folder)
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, initializer_range=init_range, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=max_positions, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, initializer_range=init_range,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    model.eval()
    model.save_pretrained(str(folder))
    return model


def q4_1_reference(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a Q4_1 GGUF holds and what transformers hands back for it: llama.cpp's
    quantize_row_q4_1 (d = (max - min) / 15, levels round((x - min) / d) clipped to 15, d and
    min stored as float16) and gguf-py's dequantization (float32 d * q + m).
    Returns (dequantized float32 weight, levels)."""
    out, inputs = weight.shape
    blocks = weight.reshape(out, inputs // 32, 32).astype(np.float32)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = (hi - lo) / np.float32(15)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.minimum(15, ((blocks - lo[..., None]) * inv[..., None] + np.float32(0.5)).astype(np.int8)).astype(np.uint8)
    d16, m16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    return (d16[..., None] * q.astype(np.float32) + m16[..., None]).reshape(out, inputs), q.reshape(out, inputs)


def q8_0_reference(weight: np.ndarray) -> np.ndarray:
    """What a Q8_0 GGUF tensor (SmolLM2's embedding) reaches transformers as: llama.cpp's
    quantize_row_q8_0 (d = amax / 127, levels round(x / d), d stored as float16) and gguf-py's
    float32 d * q."""
    out, inputs = weight.shape
    blocks = weight.reshape(out, inputs // 32, 32).astype(np.float32)
    d = np.abs(blocks).max(-1) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.rint(blocks * inv[..., None])
    return (d.astype(np.float16).astype(np.float32)[..., None] * q).reshape(out, inputs).astype(np.float32)


def build_gguf_like_llama(folder: Path, seed: int = 0):
    """A tiny Llama holding what transformers loads from a GGUF like SmolLM2's: Q4_1 blocks in every
    Linear, a Q8_0 embedding tied to the lm_head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, initializer_range=0.3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    quantize_linears_q4_1(model)  # the tied lm_head is the embedding: Q8_0 below, after the Linears
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.from_numpy(q8_0_reference(emb.detach().numpy())))
    model.save_pretrained(str(folder))
    return model


def quantize_linears_q4_1(model) -> None:
    """Replace every nn.Linear weight of a torch model by its Q4_1 round trip (q4_1_reference):
    the model then holds what transformers loads from a Q4_1 GGUF."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                weight, _ = q4_1_reference(module.weight.detach().numpy())
                module.weight.copy_(torch.from_numpy(weight))


def build_decoder_model(kind: str, folder: Path, seed: int = 0, q4_1: bool = False, **config):
    """A tiny random Qwen2 ("qwen2"), Qwen3 ("qwen3") or Gemma ("gemma") causal LM saved to `folder`
    with the test tokenizer. Defaults: GQA with 4 heads of 16 and 2 KV heads; `config` overrides. transformers
    initializes biases to 0 and norm weights to 1, which would hide a bias or a norm the graph
    forgot, so every bias and every RMSNorm weight (q_norm/k_norm included) is drawn at random.
    q4_1: every Linear weight becomes its Q4_1 round trip (the biases stay float)."""
    import torch
    from transformers import (GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = build_tokenizer(folder)
    torch.manual_seed(seed)
    base = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    base.update(config)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**base))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**base))
    elif kind == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**{"head_dim": base["hidden_size"] // base["num_attention_heads"], **base}))
    else:
        raise ValueError(kind)
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif "norm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.3)
    if q4_1:
        quantize_linears_q4_1(model)
    model.save_pretrained(str(folder))
    return model


def build_gemma3_model(folder: Path, seed: int = 0, q4_1: bool = False, **config):
    """A tiny random Gemma 3 text model (Gemma3ForCausalLM) saved to `folder` with the test
    tokenizer: sliding-window layers (window 8) between full ones (sliding, sliding, full, sliding),
    each kind with its own rotary base, q/k norms, sandwich norms, a query scale that is not
    head_dim's, a tied lm_head. Every norm weight is random (Gemma scales by 1 + w, and
    transformers initializes w to 0, which would hide a norm the graph forgot); eager attention,
    the implementation that honours attn_logit_softcapping. `config` overrides."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = build_tokenizer(folder)
    torch.manual_seed(seed)
    base = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, initializer_range=0.3, sliding_window=8, query_pre_attn_scalar=24, rope_theta=1e6,
        rope_local_base_freq=1e4, tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    base.update(config)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**base, attn_implementation="eager"))
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    if q4_1:
        quantize_linears_q4_1(model)
    model.save_pretrained(str(folder))
    return model
