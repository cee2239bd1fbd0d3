"""Execution-provider choice and options, kept free of any session so it is testable without a GPU."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def trt_profile_shapes(
    input_names: Sequence[str],
    num_kv_heads: int,
    head_dim: int,
    max_batch: int,
    max_positions: int,
) -> dict[str, str]:
    """Explicit TensorRT optimization profiles for every dynamic input, past KV included.

    Without them TensorRT rebuilds its engine whenever a shape leaves the one it first saw,
    which for a growing KV cache is every step."""
    opt_batch = max(1, min(8, max_batch))
    opt_len = min(512, max_positions)

    def dims(name: str, batch: int, seq: int, past: int) -> str:
        if name.startswith("past_key_values"):
            return f"{name}:{batch}x{num_kv_heads}x{past}x{head_dim}"
        if name == "attention_mask":
            return f"{name}:{batch}x{past + seq}"
        if name == "tree_mask":
            return f"{name}:{batch}x{seq}x{past + seq}"
        if name == "logits_index":
            return f"{name}:{batch * seq}"
        return f"{name}:{batch}x{seq}"

    static = {"logits_to_keep"}  # shape [1]: TensorRT wants profiles for dynamic inputs only

    def profile(batch: int, seq: int, past: int) -> str:
        return ",".join(dims(n, batch, seq, past) for n in input_names if n not in static)

    return {
        "trt_profile_min_shapes": profile(1, 1, 0),
        "trt_profile_opt_shapes": profile(opt_batch, 1, opt_len),
        "trt_profile_max_shapes": profile(max_batch, max_positions, max_positions),
    }


def resolve_providers(
    provider: str,
    model_dir: str | os.PathLike,
    *,
    input_names: Sequence[str] = (),
    num_kv_heads: int = 1,
    head_dim: int = 1,
    max_positions: int = 2048,
    max_batch: int = 64,
    fp16: bool = False,
    graph: str = "optimum",
    available: Sequence[str] | None = None,
    ort_version: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Turn a user's provider word into ORT's (name, options) list, CPU always last as fallback.

    `auto` takes CUDA when this onnxruntime build has it (and can run the graph), else CPU:
    TensorRT is only used when asked, because its first engine build takes minutes. epic-ort's
    lean graph (`graph="lean"`) attends with com.microsoft GroupQueryAttention plus an additive
    bias (left padding, EPIC's token trees); ONNX Runtime's CUDA kernel takes that bias from 1.29
    on, for fp16 only (there is no float32 CUDA kernel), so a lean graph runs on a GPU only as an
    fp16 export under onnxruntime >= 1.29 (`ort_version`, default the installed one). Anywhere
    else every layer would round-trip the KV cache through the host: `auto` keeps such a graph
    on the CPU and `cuda`/`tensorrt` refuse it."""
    if provider not in PROVIDERS:
        raise InvalidRequestError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    have = list(available) if available is not None else available_providers()
    cpu = ("CPUExecutionProvider", {})
    why_not = lean_gpu_refusal(fp16, have, ort_version) if graph == "lean" and provider != "cpu" else None
    if provider == "auto":
        provider = "cuda" if _ORT_NAMES["cuda"] in have and why_not is None else "cpu"
    if provider == "cpu":
        return [cpu]
    name = _ORT_NAMES[provider]
    if name not in have:
        raise InvalidRequestError(
            f"provider {provider!r} is not available in this onnxruntime build (it has: {', '.join(have)}); "
            "install onnxruntime-gpu (`pip uninstall -y onnxruntime && pip install onnxruntime-gpu`) on a machine with an NVIDIA GPU"
        )
    if why_not is not None:
        raise InvalidRequestError(f"{model_dir} holds epic-ort's lean graph, which cannot run on {provider}: {why_not}")
    cuda = ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})
    if provider == "cuda":
        return [cuda, cpu]
    cache = Path(model_dir) / "trt_cache"
    trt_opts: dict[str, Any] = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": 2 << 30,
    }
    trt_opts.update(trt_profile_shapes(input_names, num_kv_heads, head_dim, max_batch, max_positions))
    out = [(name, trt_opts)]
    if _ORT_NAMES["cuda"] in have:
        out.append(cuda)
    out.append(cpu)
    return out


LEAN_GPU_ORT = (1, 29)  # the first onnxruntime whose CUDA GroupQueryAttention takes attention_bias (fp16/bf16)


def lean_gpu_refusal(fp16: bool, available: Sequence[str], ort_version: str | None = None) -> str | None:
    """Why a lean graph cannot run on CUDA here (None: it can), as the end of one sentence. TensorRT
    has no GroupQueryAttention: it hands those nodes to CUDA, so CUDA is needed either way."""
    if not fp16:
        return ("its float32 attention (GroupQueryAttention with an attention bias) has no CUDA kernel; "
                "re-export with `epic-ort export MODEL DIR --graph lean --dtype fp16`, or `--graph optimum`, "
                "or use --provider cpu")
    if _ORT_NAMES["cuda"] not in available:
        return ("its attention runs on CUDA only and this onnxruntime build has no CUDAExecutionProvider; "
                "install onnxruntime-gpu >= 1.29, or use --provider cpu")
    version = ort_version if ort_version is not None else _installed_ort_version()
    if _major_minor(version) < LEAN_GPU_ORT:
        return (f"its attention bias needs onnxruntime-gpu >= 1.29 on CUDA (this is {version}); "
                "`pip install -U onnxruntime-gpu`, or export with --graph optimum, or use --provider cpu")
    return None


def _installed_ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def _major_minor(version: str) -> tuple[int, int]:
    """(1, 29) of "1.29.0", "1.29.0.dev20250601" or "1.30.1+cu126"; (0, 0) when unreadable."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def device_of(providers: list[tuple[str, dict[str, Any]]]) -> str:
    """Where the KV cache should live: on the GPU for CUDA/TensorRT, else host memory."""
    return "cuda" if providers[0][0] in (_ORT_NAMES["cuda"], _ORT_NAMES["tensorrt"]) else "cpu"
