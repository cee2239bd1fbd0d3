"""The hand-built lean Llama graph (epic_ort.export.llama_graph) against PyTorch and against the
Optimum export it replaces: same inputs/outputs, same logits, interchangeable KV caches, and it
survives the fp16 / int8 post-processing of `epic-ort export`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import epic_ort  # noqa: E402
from epic_ort.export import llama_graph  # noqa: E402
from epic_ort.export.llama_graph import build_llama_onnx, supports  # noqa: E402
from epic_ort.runtime.model import left_pad  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _hf_model(folder: Path, **config):
    """A tiny random Llama (GQA: 4 heads of 16, 2 KV heads) saved to `folder`, with the test tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from tiny_models import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _, vocab = build_tokenizer(folder)
    torch.manual_seed(1)
    mistral = config.pop("mistral", False)
    q4_1 = config.pop("q4_1", False)
    base = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    base.update(config)
    model = MistralForCausalLM(MistralConfig(**base)) if mistral else LlamaForCausalLM(LlamaConfig(**base))
    model.eval()
    if q4_1:
        from tiny_models import quantize_linears_q4_1

        quantize_linears_q4_1(model)
    model.save_pretrained(str(folder))
    return model


def _lean_folder(hf_model, hf_dir: Path, out: Path) -> Path:
    """An epic-ort model folder (tokenizer + manifest) whose model.onnx is the lean graph."""
    from transformers import AutoTokenizer

    from epic_ort.export.exporter import _build_manifest
    from epic_ort.fileio import write_json_atomic
    from epic_ort.runtime.manifest import MANIFEST_NAME

    out.mkdir(parents=True, exist_ok=True)
    build_llama_onnx(hf_model, out / "model.onnx")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy(hf_dir / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    manifest = _build_manifest(out, hf_model.config, tokenizer, str(hf_dir), "fp32", llama_graph.OPSET, None)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return out


@pytest.fixture(scope="module")
def lean(tmp_path_factory, tiny_exports):
    """{variant: (torch model, lean folder)}. 'llama' is the very model of the Optimum tiny export."""
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("lean")
    hf_dir = tiny_exports["llama"]["hf"]
    models = {"llama": (AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval(), hf_dir)}
    for name, config in {
        "tied": {"tie_word_embeddings": True},
        "theta": {"rope_theta": 500.0, "num_key_value_heads": 1},
        "mistral": {"mistral": True, "sliding_window": None, "rope_theta": 1e6},
        "narrow_heads": {"hidden_size": 32},  # heads of 8: RotaryEmbedding nodes, not attention's own rotary
        "q4_1": {"q4_1": True},  # every Linear holds Q4_1 blocks, as a Q4_1 GGUF loads: packed to 4 bits
    }.items():
        models[name] = (_hf_model(base / f"{name}-hf", **config), base / f"{name}-hf")
    return {name: (m, _lean_folder(m, d, base / f"{name}-lean")) for name, (m, d) in models.items()}


def _torch_logits(model, ids, mask):
    import torch

    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.numpy()


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(3, vocab, size=n)) for n in (7, 2, 5)]
    ids, mask = left_pad(rows, pad_id=2)
    return ids, mask, rng.integers(3, vocab, size=(3, 4))


@pytest.mark.parametrize("variant", ["llama", "tied", "theta", "mistral", "narrow_heads", "q4_1"])
def test_prefill_and_cached_steps_match_pytorch(lean, variant):
    hf_model, folder = lean[variant]
    model = epic_ort.load(folder, provider="cpu")
    ids, mask, extra = _batch(model.vocab_size)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    ref = _torch_logits(hf_model, full_ids, full_mask)
    n = ids.shape[1]

    # last_only=False also runs check_finite over the padding rows (fully masked queries)
    logits, cache = model.forward(ids, model.empty_cache(3), mask, last_only=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[:, :n][real], atol=1e-4)
    for t in range(extra.shape[1]):
        logits, cache = model.step(extra[:, t], cache)
        np.testing.assert_allclose(logits, ref[:, n + t], atol=1e-4)
    assert cache.length == full_ids.shape[1]


def test_multi_token_step_on_a_cache(lean):
    """seq > 1 with past > 0: causality is offset by the past length."""
    hf_model, folder = lean["llama"]
    model = epic_ort.load(folder, provider="cpu")
    ids, mask, extra = _batch(model.vocab_size, seed=1)
    ref = _torch_logits(hf_model, np.concatenate([ids, extra], 1), np.concatenate([mask, np.ones_like(extra)], 1))
    _, cache = model.forward(ids, model.empty_cache(3), mask)
    logits, cache = model.forward(extra, cache, last_only=False)
    np.testing.assert_allclose(logits, ref[:, ids.shape[1]:], atol=1e-4)


def test_same_contract_and_interchangeable_caches_with_optimum(lean, tiny_exports):
    hf_model, folder = lean["llama"]
    optimum_dir = tiny_exports["llama-optimum"]["onnx"]

    def io(path):
        g = onnx.load(str(path), load_external_data=False).graph
        init = {i.name for i in g.initializer}
        dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        return {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in [*g.input, *g.output] if v.name not in init}

    lean_io, optimum_io = io(folder / "model.onnx"), io(optimum_dir / "model.onnx")
    assert lean_io.pop("logits_index") == (onnx.TensorProto.INT64, ["logits_count"])  # the lean graph's two extra inputs
    assert lean_io.pop("tree_mask")[0] == onnx.TensorProto.BOOL
    assert lean_io.pop("logits") == (onnx.TensorProto.FLOAT, ["logits_count", hf_model.config.vocab_size])
    optimum_io.pop("logits")
    # same names, element types and ranks; the past may be longer than the past (capacity)
    assert {k: (t, len(d)) for k, (t, d) in lean_io.items()} == {k: (t, len(d)) for k, (t, d) in optimum_io.items()}
    assert lean_io["past_key_values.0.key"][1][2] == "capacity"
    nodes = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
    assert len(nodes) <= 16 * hf_model.config.num_hidden_layers + 30  # + the shared mask and lm_head pick

    lean_lm, opt_lm = epic_ort.load(folder, provider="cpu"), epic_ort.load(optimum_dir, provider="cpu")
    assert lean_lm.kv_in_place and not opt_lm.kv_in_place
    ids, mask, extra = _batch(lean_lm.vocab_size, seed=2)
    a, lean_cache = lean_lm.forward(ids, lean_lm.empty_cache(3), mask)
    b, opt_cache = opt_lm.forward(ids, opt_lm.empty_cache(3), mask)
    np.testing.assert_allclose(a, b, atol=1e-4)
    for (x, y) in zip(lean_cache.tensors(), opt_cache.tensors()):
        np.testing.assert_allclose(x, y, atol=1e-5)
    # each graph continues from the other's cache
    a, _ = opt_lm.step(extra[:, 0], lean_cache)
    b, _ = lean_lm.step(extra[:, 0], opt_cache)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_logits_index_picks_positions(lean):
    """`logits_index` gives exactly the logits of the listed positions (row x length + position),
    in the order listed; the runtime's last-position, all-position and (row, position) requests
    agree with each other, and the cache is the same whichever logits were asked for."""
    import onnxruntime as ort

    _, folder = lean["llama"]
    model = epic_ort.load(folder, provider="cpu")
    ids, mask, _ = _batch(model.vocab_size, seed=4)
    rows, t = ids.shape
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
    empty = np.zeros((rows, model.spec.num_kv_heads, 0, model.spec.head_dim), np.float32)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "tree_mask": np.ones((1, 1, 1), bool), **{n: empty for n in model.spec.past_names}}
    full = session.run(["logits"], {**feed, "logits_index": np.arange(rows * t)})[0]
    assert full.shape == (rows * t, model.vocab_size)
    pick = np.array([t * 2 + 1, 0, t - 1, t * 2 + 1])
    part = session.run(["logits"], {**feed, "logits_index": pick})[0]
    np.testing.assert_allclose(part, full[pick], atol=1e-5)
    last, cache = model.forward(ids, model.empty_cache(rows), mask)
    every, cache_all = model.forward(ids, model.empty_cache(rows), mask, last_only=False)
    at, _ = model.forward(ids, model.empty_cache(rows), mask, logits_at=(np.array([2, 0]), np.array([1, t - 1])))
    assert every.shape == (rows, t, model.vocab_size) and at.shape == (2, model.vocab_size)
    np.testing.assert_allclose(every.reshape(rows * t, -1), full, atol=1e-5)
    np.testing.assert_allclose(last, every[:, -1], atol=1e-5)
    np.testing.assert_allclose(at, every[[2, 0], [1, t - 1]], atol=1e-5)
    for a, b in zip(cache.tensors(), cache_all.tensors()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["llama", "narrow_heads"])
def test_token_tree_longer_than_max_positions(lean, variant):
    """A token tree may hold more keys than max_position_embeddings while no position reaches it
    (siblings share a position): 24 sibling candidates after a prefix 8 short of the limit each get
    the logits of a plain step with that token, though the row has limit + 16 keys."""
    hf_model, folder = lean[variant]
    model = epic_ort.load(folder, provider="cpu")
    limit = hf_model.config.max_position_embeddings
    rng = np.random.default_rng(5)
    prefix = rng.integers(3, model.vocab_size, size=(1, limit - 8))
    _, cache = model.forward(prefix, model.empty_cache(1))
    siblings = rng.integers(3, model.vocab_size, size=(1, 24))
    n = prefix.shape[1]
    tree = np.zeros((1, 24, n + 24), dtype=bool)
    tree[0, :, :n] = True
    tree[0, np.arange(24), n + np.arange(24)] = True  # each sees the prefix and itself
    logits, _ = model.forward(siblings, cache.select([0], room=24), positions=np.full((1, 24), n),
                              tree_mask=tree, last_only=False, scratch=True)
    for j in range(24):
        one, _ = model.step(siblings[:, j], cache.select([0], room=1))
        np.testing.assert_allclose(logits[0, j], one[0], atol=1e-4)


def _quantize_dynamic(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name("dynamic.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"], per_channel=True)
    tmp.replace(path)


@pytest.mark.parametrize("variant", ["llama", "tied"])
def test_fp16_and_int8_post_processing(lean, tmp_path, variant):
    """The exporter's fp16 conversion and int8 quantization, and ORT's dynamic quantization."""
    from epic_ort.export.exporter import _convert_fp16, _quantize_int8

    _, folder = lean[variant]
    ref_model = epic_ort.load(folder, provider="cpu")
    ids, mask, extra = _batch(ref_model.vocab_size, seed=3)
    ref, ref_cache = ref_model.forward(ids, ref_model.empty_cache(3), mask)
    ref_step, _ = ref_model.step(extra[:, 0], ref_cache)
    scale = float(np.abs(ref).max())  # fp16 keeps ~3 significant digits of the logits, not a fixed number of decimals
    for name, convert, tol in (("fp16", _convert_fp16, 5e-3 * scale), ("int8", _quantize_int8, 0.5),
                               ("dynamic", _quantize_dynamic, 0.5)):
        out = tmp_path / name
        shutil.copytree(folder, out)
        convert(out / "model.onnx")
        model = epic_ort.load(out, provider="cpu")  # manifest sha is not checked at load
        logits, cache = model.forward(ids, model.empty_cache(3), mask, last_only=False)  # check_finite: no NaN
        step, _ = model.step(extra[:, 0], cache)
        assert np.abs(logits[:, -1] - ref).max() < tol, name
        assert np.abs(step - ref_step).max() < tol, name
        assert np.abs(step - ref_step).max() > 0, name


def test_external_data_when_large(lean, tmp_path, monkeypatch):
    import onnxruntime as ort

    hf_model, folder = lean["tied"]
    from epic_ort.export.lean import graph as lean_graph

    monkeypatch.setattr(lean_graph, "MAX_PROTO_BYTES", 0)
    path = tmp_path / "model.onnx"
    build_llama_onnx(hf_model, path)
    assert (tmp_path / "model.onnx.data").is_file()
    assert path.stat().st_size < 100_000

    def run(p):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        feed = {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
                "position_ids": np.array([[0, 1, 2]]), "logits_index": np.arange(3),
                "tree_mask": np.ones((1, 1, 1), bool)}
        for i in s.get_inputs():
            if i.name.startswith("past_key_values."):
                feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        return s.run(["logits"], feed)[0]

    np.testing.assert_array_equal(run(path), run(folder / "model.onnx"))


def test_supports():
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    ok = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    assert supports(ok) is None
    assert supports(LlamaConfig(rope_scaling={"rope_type": "default"})) is None
    assert "gpt2" in supports(GPT2Config())
    scaled = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert "rope_scaling" in supports(scaled)
    assert "rope_scaling" in supports(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert "attention_bias" in supports(LlamaConfig(attention_bias=True))
    assert "hidden_act" in supports(LlamaConfig(hidden_act="gelu"))
    assert "sliding_window" in supports(MistralConfig(sliding_window=4096, max_position_embeddings=32768))
    assert supports(MistralConfig(sliding_window=None)) is None


def test_build_refuses_unsupported(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling"):
        build_llama_onnx(LlamaForCausalLM(config), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("variant, fused", [("llama", True), ("narrow_heads", False)])
def test_rotary_inside_attention_when_heads_allow(lean, variant, fused):
    """Heads of a multiple of 16 rotate inside GroupQueryAttention (no Split/RotaryEmbedding nodes
    per layer); narrower heads keep them. Both match PyTorch (test above)."""
    graph = onnx.load(str(lean[variant][1] / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    do_rotary = {a.i for n in attention for a in n.attribute if a.name == "do_rotary"}
    assert len(attention) == 2
    assert do_rotary == {int(fused)}
    assert sum(n.name.endswith("split_qkv") for n in graph.node) == (0 if fused else 2)
    assert sum(op == "RotaryEmbedding" for op in ops) == (0 if fused else 4)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_q4_1_weights_stay_four_bit(lean, tmp_path):
    """Every product of a Q4_1 model runs as MatMulNBits with the blocks' offsets beside it; the
    float32 build of the same weights gives the same logits up to float32 rounding (the offsets
    are summed apart from the levels), and the
    4-bit file is the smaller. Random float weights keep plain MatMuls (test above: 'llama')."""
    hf_model, folder = lean["q4_1"]
    layers = hf_model.config.num_hidden_layers
    assert _ops(folder / "model.onnx").count("MatMulNBits") == 4 * layers  # qkv, o, gate|up, down
    assert _ops(lean["llama"][1] / "model.onnx").count("MatMulNBits") == 0
    unpacked = tmp_path / "unpacked"
    shutil.copytree(folder, unpacked)
    assert build_llama_onnx(hf_model, unpacked / "model.onnx", pack_weights=False) == 0
    assert "MatMulNBits" not in _ops(unpacked / "model.onnx")
    assert (folder / "model.onnx").stat().st_size < (unpacked / "model.onnx").stat().st_size

    ids, mask, extra = _batch(hf_model.config.vocab_size, seed=5)
    results = []
    for f in (folder, unpacked):
        model = epic_ort.load(f, provider="cpu")
        logits, cache = model.forward(ids, model.empty_cache(3), mask, last_only=False)
        step, _ = model.step(extra[:, 0], cache)
        results.append((logits[mask.astype(bool)], step))
    scale = float(np.abs(results[1][0]).max())
    for packed, plain in zip(*results):
        np.testing.assert_allclose(packed, plain, rtol=0, atol=1e-5 * scale)  # offsets: O(scale) when wrong


def test_explicit_zero_points_where_midpoint_offsets_are_inexact(lean, tmp_path, monkeypatch):
    """Blocks whose m + 8d float32 cannot hold keep levels as q with zero points 0: same logits."""
    from epic_ort.export.packing import PackedWeight

    hf_model, folder = lean["q4_1"]
    monkeypatch.setattr(PackedWeight, "midpoint_offsets", lambda self: None)
    out = tmp_path / "zero_points"
    shutil.copytree(folder, out)
    assert build_llama_onnx(hf_model, out / "model.onnx") == 4 * hf_model.config.num_hidden_layers
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    default = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert {len(n.input) for n in nodes} == {4} and {len(n.input) for n in default} == {3}
    ids, mask, _ = _batch(hf_model.config.vocab_size, seed=6)
    model = epic_ort.load(out, provider="cpu")
    a, _ = model.forward(ids, model.empty_cache(3), mask)
    ref = _torch_logits(hf_model, ids, mask)[:, -1]
    np.testing.assert_allclose(a, ref, atol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "q4_1"])
def test_every_initializer_is_used(lean, variant):
    """ONNX Runtime warns on stderr about initializers no node reads."""
    graph = onnx.load(str(lean[variant][1] / "model.onnx")).graph
    read = {name for n in graph.node for name in n.input}
    assert {i.name for i in graph.initializer} <= read
