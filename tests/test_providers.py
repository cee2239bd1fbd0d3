"""Provider choice and options, tested without a GPU."""

import pytest

from epic_ort.errors import InvalidRequestError
from epic_ort.runtime.providers import device_of, resolve_providers, trt_profile_shapes

NAMES = ["input_ids", "attention_mask", "position_ids"] + [
    f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")
]
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


def test_auto_prefers_cuda_only_when_available(tmp_path):
    assert resolve_providers("auto", tmp_path, available=CPU) == [("CPUExecutionProvider", {})]
    got = resolve_providers("auto", tmp_path, available=GPU)
    assert [n for n, _ in got] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert device_of(got) == "cuda"


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_gpu_provider_is_a_clear_error(tmp_path, provider):
    with pytest.raises(InvalidRequestError, match="onnxruntime-gpu"):
        resolve_providers(provider, tmp_path, available=CPU)


def test_unknown_provider(tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown provider"):
        resolve_providers("tpu", tmp_path, available=GPU)


def test_tensorrt_options_cache_profiles_fp16(tmp_path):
    got = resolve_providers("tensorrt", tmp_path, input_names=NAMES, num_kv_heads=3, head_dim=64,
                            max_positions=2048, max_batch=16, fp16=True, available=GPU)
    name, opts = got[0]
    assert name == "TensorrtExecutionProvider"
    assert [n for n, _ in got[1:]] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_engine_cache_enable"] is True
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
    assert opts["trt_fp16_enable"] is True
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        entries = dict(e.split(":") for e in opts[key].split(","))
        assert set(entries) == set(NAMES)  # every dynamic input, all past KV included
    mx = dict(e.split(":") for e in opts["trt_profile_max_shapes"].split(","))
    assert mx["past_key_values.1.value"] == "16x3x2048x64"
    assert mx["attention_mask"] == "16x4096"
    mn = dict(e.split(":") for e in opts["trt_profile_min_shapes"].split(","))
    assert mn["past_key_values.0.key"] == "1x3x0x64" and mn["input_ids"] == "1x1"


def test_profiles_are_ordered_min_opt_max():
    p = trt_profile_shapes(NAMES, 3, 64, max_batch=8, max_positions=1024)
    def dims(key):
        return {e.split(":")[0]: [int(x) for x in e.split(":")[1].split("x")] for e in p[key].split(",")}
    lo, mid, hi = dims("trt_profile_min_shapes"), dims("trt_profile_opt_shapes"), dims("trt_profile_max_shapes")
    for n in NAMES:
        assert all(a <= b <= c for a, b, c in zip(lo[n], mid[n], hi[n])), n


def test_static_logits_to_keep_gets_no_profile():
    """The lean graph's `logits_to_keep` has the fixed shape [1]: a profile for it would be
    rejected by TensorRT, so only the dynamic inputs are listed."""
    p = trt_profile_shapes(NAMES + ["logits_to_keep"], 3, 64, max_batch=8, max_positions=1024)
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        assert {e.split(":")[0] for e in p[key].split(",")} == set(NAMES)


def test_logits_index_profile_spans_one_to_every_position():
    """`logits_index` lists picked positions: from 1 (one row's last) through one per row (decoding)
    to every position of the largest batch (scoring text)."""
    p = trt_profile_shapes(NAMES + ["logits_index"], 3, 64, max_batch=8, max_positions=1024)

    def size(key):
        return int(dict(e.split(":") for e in p[key].split(","))["logits_index"])

    assert (size("trt_profile_min_shapes"), size("trt_profile_opt_shapes"), size("trt_profile_max_shapes")) == (1, 8, 8 * 1024)


def test_lean_graph_stays_on_the_cpu(tmp_path):
    """The lean graph's attention (GroupQueryAttention with an attention bias) has no CUDA kernel:
    `auto` keeps it on the CPU even where CUDA is available, and asking for a GPU says what to export."""
    assert resolve_providers("auto", tmp_path, graph="lean", available=GPU) == [("CPUExecutionProvider", {})]
    assert resolve_providers("cpu", tmp_path, graph="lean", available=GPU) == [("CPUExecutionProvider", {})]
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(InvalidRequestError, match="--graph optimum"):
            resolve_providers(provider, tmp_path, graph="lean", available=GPU)
    got = resolve_providers("cuda", tmp_path, graph="optimum", available=GPU)
    assert [n for n, _ in got] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
