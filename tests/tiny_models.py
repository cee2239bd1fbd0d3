"""Tiny random Llama / GPT-2 models with a character-level tokenizer, built inside the test suite
so that unit tests need no downloads. Exported through epic-ort's own exporter."""

from __future__ import annotations

import string
from pathlib import Path

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
