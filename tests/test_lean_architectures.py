"""The lean graph's other architectures (epic_ort.export.lean): tiny random Qwen2, Qwen3 and Gemma models
exported through `epic-ort export --graph lean` against transformers float32 (prefill and cached
steps of a left-padded batch, greedy generation), their graph structure, and which configs the
architecture table accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import epic_ort  # noqa: E402
from epic_ort.export import export  # noqa: E402
from epic_ort.export.lean import ARCHITECTURES, build_lean_onnx, supports  # noqa: E402
from epic_ort.runtime.model import left_pad  # noqa: E402

# name: (architecture, graph option, config overrides). Heads of 16 rotate inside attention; heads
# of 8 go through Split + RotaryEmbedding nodes. Biases and norm weights are random (tiny_models).
VARIANTS = {
    "qwen2": ("qwen2", "lean", {"tie_word_embeddings": True}),  # tied, packed q|k|v + bias
    "qwen2_narrow": ("qwen2", "lean", {"hidden_size": 32}),  # heads of 8
    "qwen2_q4_1": ("qwen2", "lean", {"q4_1": True}),  # 4-bit products + float biases
    "qwen3": ("qwen3", "auto", {"head_dim": 32}),  # q|k|v of 128 from a hidden of 64; auto picks lean
    "qwen3_narrow_bias": ("qwen3", "lean", {"head_dim": 8, "attention_bias": True}),  # q, k, v and o biases
    # Gemma: norms scale by 1 + w, embeddings by sqrt(hidden), tanh GELU; exact GELU in the second
    "gemma": ("gemma", "auto", {"tie_word_embeddings": True}),
    "gemma_gelu": ("gemma", "lean", {"hidden_act": "gelu", "num_key_value_heads": 1}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{variant: (torch model, export folder, manifest)}."""
    from tiny_models import build_decoder_model

    base = tmp_path_factory.mktemp("lean_arch")
    out = {}
    for seed, (name, (kind, graph, config)) in enumerate(VARIANTS.items()):
        hf_dir = base / f"{name}-hf"
        model = build_decoder_model(kind, hf_dir, seed=seed, **config)
        manifest = export(str(hf_dir), base / f"{name}-onnx", graph=graph, log=lambda m: None)
        out[name] = (model, base / f"{name}-onnx", manifest)
    return out


def _torch_logits(model, ids, mask):
    import torch

    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.numpy()


def _rows(vocab: int, seed: int) -> tuple[list[list[int]], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, vocab, size=n)) for n in (7, 2, 5)], rng.integers(3, vocab, size=(3, 4))


def _ops(folder: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_cached_steps_match_transformers(exported, variant):
    hf_model, folder, manifest = exported[variant]
    assert manifest.graph == "lean" and manifest.model_type == VARIANTS[variant][0]
    model = epic_ort.load(folder, provider="cpu")
    rows, extra = _rows(model.vocab_size, seed=len(variant))
    ids, mask = left_pad(rows, pad_id=2)
    full_ids = np.concatenate([ids, extra], axis=1)
    ref = _torch_logits(hf_model, full_ids, np.concatenate([mask, np.ones_like(extra)], axis=1))
    tol = 2e-5 * float(np.abs(ref).max())  # a forgotten bias or norm moves logits by O(their scale)
    n = ids.shape[1]

    logits, cache = model.forward(ids, model.empty_cache(3), mask, last_only=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[:, :n][real], rtol=0, atol=tol)
    for t in range(extra.shape[1]):
        logits, cache = model.step(extra[:, t], cache)
        np.testing.assert_allclose(logits, ref[:, n + t], rtol=0, atol=tol)
    assert cache.length == full_ids.shape[1]


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "qwen3_narrow_bias", "gemma"])
def test_greedy_generation_matches_transformers(exported, variant):
    import torch

    hf_model, folder, _ = exported[variant]
    model = epic_ort.load(folder, provider="cpu")
    rows, _ = _rows(model.vocab_size, seed=11)
    n = 12
    config = epic_ort.GenerationConfig(max_new_tokens=n, greedy=True)
    ours = sorted(epic_ort.generate(model, prompt_ids=rows, config=config, batch_size=3),
                  key=lambda s: s.prompt_index)
    ids, mask = left_pad(rows, pad_id=2)
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=n, pad_token_id=2, eos_token_id=2)
    ref = [r[: r.index(2) + 1] if 2 in r else r for r in out[:, ids.shape[1]:].tolist()]
    assert [s.token_ids for s in ours] == ref
    assert sum(len(r) for r in ref) > 3 * 3  # not all stopped at once


def test_graph_structure(exported):
    """Biases are one Add after the fused product (none for Qwen2's o_proj); a q/k norm splits q|k|v
    and normalizes each head; heads of 16 still rotate inside attention."""
    layers = 2
    qwen2 = onnx.load(str(exported["qwen2"][1] / "model.onnx"), load_external_data=False).graph
    names = [n.name for n in qwen2.node]
    assert sum(n.endswith("qkv_proj/bias") for n in names) == layers
    assert not any(n.endswith("o_proj/bias") for n in names) and not any("split_qkv" in n for n in names)
    assert "FusedMatMul" in [n.op_type for n in qwen2.node]  # tied lm_head

    qwen3 = _ops(exported["qwen3"][1])
    assert qwen3.count("RMSNormalization") == 1 + 2 * layers  # layer 0's input norm + q_norm, k_norm
    assert qwen3.count("Split") == 2 * layers and "RotaryEmbedding" not in qwen3
    narrow = onnx.load(str(exported["qwen3_narrow_bias"][1] / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in narrow.node].count("RotaryEmbedding") == 2 * layers
    assert sum(n.name.endswith(("qkv_proj/bias", "o_proj/bias")) for n in narrow.node) == 2 * layers
    attention = [n for n in narrow.node if n.op_type == "GroupQueryAttention"]
    assert {a.i for n in attention for a in n.attribute if a.name == "do_rotary"} == {0}

    gemma = onnx.load(str(exported["gemma"][1] / "model.onnx"), load_external_data=False).graph
    gelu = [n for n in gemma.node if n.op_type == "Gelu"]
    assert len(gelu) == layers and {a.s for n in gelu for a in n.attribute} == {b"tanh"}
    assert "Sigmoid" not in [n.op_type for n in gemma.node]
    assert [n.name for n in gemma.node].count("embed/scale") == 1 and not any(
        n.name == "embed/scale" for n in qwen2.node)


def test_q4_1_products_with_biases(exported, tmp_path):
    """Every product of the Q4_1 Qwen2 stays 4-bit and its biases are added after it; the float32
    build of the same weights computes the same logits (parity with transformers: above)."""
    hf_model, folder, manifest = exported["qwen2_q4_1"]
    layers = hf_model.config.num_hidden_layers
    assert manifest.extra["packed_products"] == 4 * layers
    assert _ops(folder).count("MatMulNBits") == 4 * layers
    assert np.abs(hf_model.model.layers[0].self_attn.q_proj.bias.detach().numpy()).min() > 0
    assert build_lean_onnx(hf_model, tmp_path / "model.onnx", pack_weights=False) == 0
    graph = onnx.load(str(folder / "model.onnx")).graph
    biases = {i.name for i in graph.initializer if i.name.endswith("qkv_proj.bias")}
    assert len(biases) == layers
    assert {i.name for i in graph.initializer} <= {name for n in graph.node for name in n.input}


def test_supports_qwen_and_gemma_configs():
    from transformers import Gemma2Config, GemmaConfig, Qwen2Config, Qwen3Config

    from epic_ort.export.exporter import _choose_graph

    assert supports(Qwen2Config()) is None
    assert supports(Qwen3Config()) is None
    assert supports(Qwen3Config(attention_bias=True)) is None
    # the window only counts where it applies to a layer and is shorter than the context
    sliding = Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=0,
                          max_position_embeddings=32768)
    assert "sliding_window=4096" in supports(sliding)
    assert "sliding_window" in supports(Qwen3Config(use_sliding_window=True, sliding_window=4096,
                                                    max_window_layers=10, max_position_embeddings=40960))
    assert supports(Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=28,
                                num_hidden_layers=24)) is None  # no layer slides
    assert supports(Qwen2Config(use_sliding_window=True, sliding_window=32768, max_window_layers=0,
                                max_position_embeddings=32768)) is None  # the window covers the context
    assert supports(Qwen2Config(use_sliding_window=False, sliding_window=4096, max_window_layers=0)) is None
    yarn = Qwen2Config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert "rope_scaling" in supports(yarn)
    assert "hidden_act" in supports(Qwen3Config(hidden_act="gelu"))
    assert _choose_graph("auto", Qwen2Config(), None) == "lean"
    assert _choose_graph("auto", Qwen3Config(), None) == "lean"
    assert _choose_graph("auto", sliding, None) == "optimum"
    assert supports(GemmaConfig()) is None and supports(GemmaConfig(hidden_act="gelu")) is None
    assert "hidden_act 'silu'" in supports(GemmaConfig(hidden_act="silu"))
    assert "gemma2" in supports(Gemma2Config())  # sandwich norms, soft-capping: not in the table


def test_table_and_compatibility_module():
    """The old module still hands out the builder; the table holds today's architectures."""
    from epic_ort.export import lean, llama_graph

    assert llama_graph.build_llama_onnx is lean.build_lean_onnx and llama_graph.supports is lean.supports
    assert (llama_graph.OPSET, llama_graph.MS_DOMAIN, llama_graph.MASKED_SCORE) == (23, "com.microsoft", -1e30)
    from epic_ort.export.lean.layers import ACTIVATIONS

    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text"}
    assert ARCHITECTURES["qwen3"].qk_norm and not ARCHITECTURES["qwen2"].qk_norm
    assert all(set(a.activations) <= set(ACTIVATIONS) for a in ARCHITECTURES.values())
