"""`epic-ort export --compute int8`: the lean graph's exact weight blocks multiplied with int8 dot
products (MatMulNBits accuracy_level 4), the tied Q8_0 lm_head as 8-bit blocks. Not bit-faithful
to float32 (activations are rounded to int8 per block of 32), so the tests bound how far it moves
the logits, and check that EPIC stays exact on the int8 model's own distribution."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

import epic_ort
from epic_ort.errors import ExportError
from epic_ort.export import export
from epic_ort.sampling.kernels import entropy, log_softmax
from epic_ort.settings import GenerationConfig
from test_epic import EOS, _merged_chisquare

PROMPT = "the cat sat on the mat and then"


def _matmuls(folder):
    graph = onnx.load(str(folder / "model.onnx")).graph
    return {n.name: (n.op_type, {a.name: a.i for a in n.attribute if a.name in ("bits", "accuracy_level")})
            for n in graph.node if n.op_type in ("MatMulNBits", "FusedMatMul")}


def test_graph_runs_every_block_product_in_int8(gguf_like_exports):
    fp32, int8 = _matmuls(gguf_like_exports["fp32"]), _matmuls(gguf_like_exports["int8"])
    assert fp32["lm_head"][0] == "FusedMatMul"  # float32 arithmetic keeps the float32 head
    assert int8["lm_head"] == ("MatMulNBits", {"bits": 8, "accuracy_level": 4})
    body = [attrs for name, (op, attrs) in int8.items() if name != "lm_head"]
    assert len(body) == 4 * 2 and all(a == {"bits": 4, "accuracy_level": 4} for a in body)  # qkv, o, gate|up, down
    assert all(a["accuracy_level"] == 0 for name, (op, a) in fp32.items() if op == "MatMulNBits")
    manifest = epic_ort.load(gguf_like_exports["int8"], provider="cpu").manifest
    assert manifest.extra["compute"] == "int8" and manifest.extra["packed_products"] == 8


def _logits(folder, rows, extra):
    model = epic_ort.load(folder, provider="cpu")
    logits, cache = model.prefill(rows)
    step, _ = model.step(np.asarray(extra), cache)
    return np.concatenate([logits, step])


def test_logits_stay_close_to_float32(gguf_like_exports):
    """Rounding activations to 8 bits moves logits by about a percent of their spread; a wrong zero
    point, scale or level order would move them by their whole spread."""
    rng = np.random.default_rng(3)
    vocab = epic_ort.load(gguf_like_exports["fp32"], provider="cpu").vocab_size
    rows = [[1] + rng.integers(3, vocab, size=n).tolist() for n in (9, 4, 15, 7)]
    extra = rng.integers(3, vocab, size=4)
    ref, got = _logits(gguf_like_exports["fp32"], rows, extra), _logits(gguf_like_exports["int8"], rows, extra)
    spread = ref.std(axis=-1, keepdims=True)
    rel = np.sqrt(((got - ref) ** 2).mean(axis=-1, keepdims=True)) / spread
    print("relative rms error per row:", rel.ravel())
    assert float(rel.max()) < 0.08, rel.ravel()
    p, q = np.exp(log_softmax(ref)), np.exp(log_softmax(got))
    assert float(np.abs(p - q).sum(axis=-1).max()) < 0.1  # total variation, per row


def test_int8_gemm_runs_every_product_as_int8_gemm(gguf_like_exports):
    graph = onnx.load(str(gguf_like_exports["int8-gemm"] / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 4 * 2  # qkv, o, gate|up, down per layer
    assert _matmuls(gguf_like_exports["int8-gemm"])["lm_head"] == ("MatMulNBits", {"bits": 8, "accuracy_level": 4})
    assert ops.count("MatMulNBits") == 1 and "MatMul" not in ops  # the tied Q8_0 head: 8-bit blocks, as --compute int8
    smooth = [n for n in graph.node if n.name.endswith("/smooth")]
    assert len(smooth) == 4 * 2 and all(n.op_type == "Mul" for n in smooth)
    factors = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith(".smoothing")}
    assert len(factors) == 8 and all(np.all(f > 0) and np.ptp(f) > 0 for f in factors.values())
    levels = [t for t in graph.initializer if t.name.endswith(".int8")]
    assert levels and all(t.data_type == onnx.TensorProto.INT8 for t in levels)
    assert epic_ort.load(gguf_like_exports["int8-gemm"], provider="cpu").manifest.extra["compute"] == "int8-gemm"


def test_int8_gemm_logits_stay_close_to_float32(gguf_like_exports):
    """Weights per column and activations per token rounded to int8: on this tiny random model logits
    move by 4-15% of their spread (two roundings, where --compute int8 has one), not by all of it
    (a wrong scale axis or zero point would)."""
    rng = np.random.default_rng(4)
    vocab = epic_ort.load(gguf_like_exports["fp32"], provider="cpu").vocab_size
    rows = [[1] + rng.integers(3, vocab, size=n).tolist() for n in (9, 4, 15, 7)]
    extra = rng.integers(3, vocab, size=4)
    ref, got = _logits(gguf_like_exports["fp32"], rows, extra), _logits(gguf_like_exports["int8-gemm"], rows, extra)
    rel = np.sqrt(((got - ref) ** 2).mean(axis=-1)) / ref.std(axis=-1)
    print("relative rms error per row:", rel)
    assert float(rel.max()) < 0.25, rel
    p, q = np.exp(log_softmax(ref)), np.exp(log_softmax(got))
    assert float(np.abs(p - q).sum(axis=-1).max()) < 0.25


def _plant_outlier_channels(folder, channels=(3, 17, 40), factor=40.0) -> None:
    """Make a few hidden channels of every norm's output `factor` times larger and divide the
    weights that read them by as much: the same function, but activations with outlier channels,
    as trained LLMs have."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    idx = list(channels)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[idx] *= factor
                for proj in readers:
                    proj.weight[:, idx] /= factor
    model.save_pretrained(str(folder))


def test_int8_gemm_smoothing_absorbs_outlier_channels(tmp_path, monkeypatch):
    """With outlier channels, one scale per token leaves the other channels a few levels: the
    logits move by most of their spread. Smoothing by the peaks measured at export moves that range into
    the weights and brings the error back to the order of a plain model's."""
    from epic_ort.export import exporter
    from tiny_models import build_gguf_like_llama

    build_gguf_like_llama(tmp_path / "hf")
    _plant_outlier_channels(tmp_path / "hf")
    for name in ("fp32", "int8-gemm"):
        export(str(tmp_path / "hf"), tmp_path / name, compute=name, log=lambda m: None)
    monkeypatch.setattr(exporter, "_smoothing_peaks", lambda *args: None)
    export(str(tmp_path / "hf"), tmp_path / "plain", compute="int8-gemm", log=lambda m: None)
    rng = np.random.default_rng(5)
    vocab = epic_ort.load(tmp_path / "fp32", provider="cpu").vocab_size
    rows = [[1] + rng.integers(3, vocab, size=n).tolist() for n in (9, 4, 15, 7)]
    extra = rng.integers(3, vocab, size=4)
    ref = _logits(tmp_path / "fp32", rows, extra)
    error = {}
    for name in ("int8-gemm", "plain"):
        got = _logits(tmp_path / name, rows, extra)
        error[name] = float((np.sqrt(((got - ref) ** 2).mean(axis=-1)) / ref.std(axis=-1)).mean())
    print("mean relative rms error:", error)
    assert error["int8-gemm"] < 0.15 and error["plain"] > 3 * error["int8-gemm"], error


def test_epic_is_exact_on_the_int8_model(gguf_like_exports):
    """Horizon 1: EPIC's samples follow q_a of the int8 model's own logits and entropies (chi-square),
    and not q."""
    model = epic_ort.load(gguf_like_exports["int8"], provider="cpu")
    V = model.vocab_size
    logits, cache = model.prefill([model.encode(PROMPT)])
    lq = log_softmax(logits[0].astype(np.float64))
    nxt, _ = model.step(np.arange(V), cache.select([0] * V))
    H = entropy(nxt)
    H[EOS] = 0.0
    for a, seed in ((2.0, 21), (-1.0, 22)):
        la = lq - a * H
        qa = np.exp(la - np.logaddexp.reduce(la))
        cfg = GenerationConfig(max_new_tokens=1, alpha=a, horizon=1, rollouts=1, seed=seed)
        toks = np.array([s.token_ids[0] for s in epic_ort.generate(model, [PROMPT], cfg, num_samples=3000,
                                                                     batch_size=1000)])
        counts = np.bincount(toks, minlength=V)
        assert _merged_chisquare(counts, qa) > 1e-3, a
        assert _merged_chisquare(counts, np.exp(lq)) < 1e-6, a
        assert math.isclose(counts.sum(), 3000)


@pytest.mark.parametrize("flags, clash", [({"dtype": "fp16"}, "--dtype fp16"), ({"quantize": "int8"}, "--quantize int8"),
                                          ({"graph": "optimum"}, "--graph optimum"), ({"pack": False}, "--unpacked")])
def test_int8_compute_refuses_what_it_cannot_combine_with(tmp_path, flags, clash):
    with pytest.raises(ExportError, match=clash):
        export("no-such-model", tmp_path / "out", compute="int8", **flags)
    assert not (tmp_path / "out").exists()
