"""The lean graph in float16 (`epic-ort export --graph lean --dtype fp16`, for CUDA's
GroupQueryAttention with an attention bias), checked on the CPU EP against the float32 lean graph of
the same weights: a valid graph that is float16 throughout (float32 logits), logits within fp16's
precision of the float32 graph's at prefill and cached steps, the same greedy tokens; plus the rules
that let such a graph onto CUDA (onnxruntime >= 1.29 with CUDA, fp16 only), with injected versions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

import epic_ort  # noqa: E402
from epic_ort.errors import InvalidRequestError  # noqa: E402
from epic_ort.export import export  # noqa: E402
from epic_ort.export.lean import MASKED_SCORE_FP16  # noqa: E402
from epic_ort.runtime.model import left_pad  # noqa: E402
from epic_ort.runtime.providers import resolve_providers  # noqa: E402

# max |fp16 - fp32| / max |fp32| over the compared logits. fp16 keeps ~3 decimal digits; measured on
# these tiny random models (weights of init range 0.3, far rougher than a trained model's), prefill /
# worst step: llama 4.7e-3 / 4.6e-3, the GGUF-like llama 4.4e-3 / 6.3e-3, Gemma 3 3.3e-3 / 2.7e-3.
TOLERANCE = 1.5e-2
VARIANTS = ("llama", "gguf_like", "gemma3_capped")
GPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]
GPU_TRT = ["TensorrtExecutionProvider", *GPU]


def _hf_model(variant: str, folder):
    import tiny_models

    if variant == "llama":
        return tiny_models.build_hf_model("llama", folder)
    if variant == "gguf_like":  # Q4_1 Linears (4-bit MatMulNBits in the graph), a tied Q8_0 embedding
        return tiny_models.build_gguf_like_llama(folder)
    return tiny_models.build_gemma3_model(folder, final_logit_softcapping=3.0)  # windows, softcap, tied head


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{variant: (fp32 lean folder, fp16 lean folder, fp16 manifest)} of the same weights."""
    base = tmp_path_factory.mktemp("lean-fp16")
    out = {}
    for variant in VARIANTS:
        hf = base / f"{variant}-hf"
        _hf_model(variant, hf)
        export(str(hf), base / f"{variant}-fp32", graph="lean", log=lambda m: None)
        manifest = export(str(hf), base / f"{variant}-fp16", graph="lean", dtype="fp16", log=lambda m: None)
        out[variant] = (base / f"{variant}-fp32", base / f"{variant}-fp16", manifest)
    return out


def _elem_types(graph) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_is_float16_with_float32_logits(pairs, variant):
    fp32_dir, fp16_dir, manifest = pairs[variant]
    assert (manifest.dtype, manifest.graph) == ("fp16", "lean")
    onnx.checker.check_model(str(fp16_dir / "model.onnx"), full_check=True)
    graph = onnx.load(str(fp16_dir / "model.onnx")).graph
    types = _elem_types(graph)
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types["logits"] == F32
    kv = {n: t for n, t in types.items() if n.startswith(("past_key_values.", "present."))}
    assert len(kv) == 4 * manifest.num_layers and set(kv.values()) == {F16}
    weights = {i.name: i for i in graph.initializer}
    assert not [n for n, i in weights.items() if i.data_type == F32]  # every float constant is fp16
    shut = onnx.numpy_helper.to_array(weights["mask/shut"])
    assert shut.dtype == np.float16 and shut.tolist() == [MASKED_SCORE_FP16]
    reference = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False).graph
    assert len(graph.node) == len(reference.node) + 1  # the same graph plus the logits' Cast
    if variant == "gguf_like":
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert nbits and manifest.extra["packed_products"] == len(nbits)
        assert {weights[n.input[2]].data_type for n in nbits} == {F16}  # scales in the activations' type


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [list(rng.integers(3, vocab, size=n)) for n in (11, 3, 7)]  # longer than Gemma 3's window of 8
    ids, mask = left_pad(rows, pad_id=2)
    return ids, mask, rng.integers(3, vocab, size=(3, 5))


def _relative(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_cached_steps_track_fp32(pairs, variant):
    fp32_dir, fp16_dir, _ = pairs[variant]
    ref_lm, lm = epic_ort.load(fp32_dir, provider="cpu"), epic_ort.load(fp16_dir, provider="cpu")
    assert lm.spec.kv_dtype == np.float16 and lm.kv_in_place  # on the CPU the fp16 cache is written in place
    ids, mask, extra = _batch(lm.vocab_size)
    # last_only=False also runs check_finite over the padding rows (fully masked queries: the fp16 bias)
    ref, ref_cache = ref_lm.forward(ids, ref_lm.empty_cache(3, 8), mask, last_only=False)
    got, cache = lm.forward(ids, lm.empty_cache(3, 8), mask, last_only=False)
    real = mask.astype(bool)
    assert got.dtype == np.float32
    errors = [_relative(got[real], ref[real])]
    for t in range(extra.shape[1]):
        ref, ref_cache = ref_lm.step(extra[:, t], ref_cache)
        got, cache = lm.step(extra[:, t], cache)
        errors.append(_relative(got, ref))
    assert cache.values[0].dtype == np.float16 and cache.length == ids.shape[1] + extra.shape[1]
    print(f"{variant}: max |fp16 - fp32| / scale, prefill {errors[0]:.2e}, steps {max(errors[1:]):.2e}")
    assert max(errors) < TOLERANCE
    assert min(errors) > 0  # really a float16 graph


@pytest.mark.parametrize("variant", ["llama", "gguf_like"])
def test_greedy_tokens_agree(pairs, variant):
    fp32_dir, fp16_dir, _ = pairs[variant]
    runs = []
    for folder in (fp32_dir, fp16_dir):
        lm = epic_ort.load(folder, provider="cpu")
        logits, cache = lm.prefill([lm.encode("the quick brown fox"), lm.encode("hello")], room=12)
        tokens = []
        for _ in range(12):
            nxt = logits.argmax(axis=-1)
            tokens.append(nxt)
            logits, cache = lm.step(nxt, cache)
        runs.append(np.stack(tokens, axis=1))
    np.testing.assert_array_equal(runs[1], runs[0])
    assert len(np.unique(runs[0])) > 1  # not one repeated token, which any broken graph might also give


def test_auto_dtype_fp16_keeps_optimum_and_lean_is_asked_for():
    from transformers import LlamaConfig

    from epic_ort.export.exporter import _choose_graph

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    assert _choose_graph("auto", config, None, "fp16") == "optimum"
    assert _choose_graph("lean", config, None, "fp16") == "lean"
    assert _choose_graph("auto", config, None, "fp32") == "lean"


def test_constants_that_overflow_fp16_are_refused():
    from epic_ort.export.lean.graph import GraphBuilder, NarrowingError

    g = GraphBuilder(np.float16)
    assert g.const("fits", [1.5, -60000.0], np.float32) == "fits" and g.weights[-1][1].dtype == np.float16
    assert g.const("ids", [70000], np.int64) and g.weights[-1][1].dtype == np.int64  # integers stay
    with pytest.raises(NarrowingError, match="float16"):
        g.const("shut", -1e30, np.float32)  # the float32 graph's MASKED_SCORE


# -- which providers may run a lean graph ----------------------------------------------------------

def _names(providers):
    return [n for n, _ in providers]


@pytest.mark.parametrize("version", ["1.29.0", "1.29.0.dev20250601", "1.30.1+cu126", "2.0.0"])
def test_lean_fp16_runs_on_cuda_from_ort_1_29(tmp_path, version):
    lean = dict(graph="lean", fp16=True, ort_version=version)
    assert _names(resolve_providers("cuda", tmp_path, available=GPU, **lean)) == GPU
    assert _names(resolve_providers("auto", tmp_path, available=GPU, **lean)) == GPU
    assert _names(resolve_providers("tensorrt", tmp_path, available=GPU_TRT, **lean)) == GPU_TRT


@pytest.mark.parametrize("version", ["1.28.2", "1.3.0", "1.17.1+cu118"])  # 1.3 < 1.29: numbers, not strings
def test_lean_fp16_before_ort_1_29_is_refused(tmp_path, version):
    lean = dict(graph="lean", fp16=True, ort_version=version)
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(InvalidRequestError, match=r"onnxruntime-gpu >= 1\.29.*this is " + version.replace("+", r"\+")):
            resolve_providers(provider, tmp_path, available=GPU_TRT, **lean)
    assert _names(resolve_providers("auto", tmp_path, available=GPU_TRT, **lean)) == ["CPUExecutionProvider"]
    # Optimum's graph does not care
    assert _names(resolve_providers("cuda", tmp_path, available=GPU, fp16=True, ort_version=version)) == GPU


def test_lean_fp16_without_cuda_is_refused(tmp_path):
    lean = dict(graph="lean", fp16=True, ort_version="1.30.0")
    with pytest.raises(InvalidRequestError, match="onnxruntime-gpu"):
        resolve_providers("cuda", tmp_path, available=["CPUExecutionProvider"], **lean)
    with pytest.raises(InvalidRequestError, match="no CUDAExecutionProvider"):  # TensorRT hands GQA to CUDA
        resolve_providers("tensorrt", tmp_path, available=["TensorrtExecutionProvider", "CPUExecutionProvider"], **lean)
    assert _names(resolve_providers("auto", tmp_path, available=["CPUExecutionProvider"], **lean)) == \
        ["CPUExecutionProvider"]


def test_lean_fp32_stays_off_cuda(tmp_path):
    lean = dict(graph="lean", fp16=False, ort_version="1.30.0")
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(InvalidRequestError, match="--dtype fp16") as e:
            resolve_providers(provider, tmp_path, available=GPU_TRT, **lean)
        assert "\n" not in str(e.value)
    assert _names(resolve_providers("auto", tmp_path, available=GPU_TRT, **lean)) == ["CPUExecutionProvider"]
    assert _names(resolve_providers("cpu", tmp_path, available=GPU_TRT, graph="lean", fp16=True)) == \
        ["CPUExecutionProvider"]
