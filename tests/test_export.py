"""Export variants: weight-only int8, int8 dynamic quantization and fp16, on the tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest

import epic_ort
from epic_ort.errors import ExportError
from epic_ort.export import export


QUANT_OPS = {"int8": {"MatMulNBits"}, "int8-dynamic": {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}}


@pytest.mark.parametrize(  # tolerances relative to the largest logit: the tiny random model's weights
    # (init range 0.3) are far rougher to quantize than a trained model's
    "variant,tol", [({"quantize": "int8"}, 0.1), ({"quantize": "int8-dynamic"}, 0.2), ({"dtype": "fp16"}, 5e-3)]
)
def test_variant_loads_and_tracks_fp32(tiny_exports, tmp_path, variant, tol):
    out = tmp_path / "variant"
    manifest = export(str(tiny_exports["llama"]["hf"]), out, log=lambda m: None, **variant)
    assert manifest.quantization == variant.get("quantize")
    assert manifest.dtype == variant.get("dtype", "fp32")
    assert manifest.graph == ("optimum" if "dtype" in variant else "lean")  # fp16 is for GPUs: Optimum's graph
    model = epic_ort.load(out, provider="cpu")
    ref = epic_ort.load(tiny_exports["llama"]["onnx"], provider="cpu")
    ids = [ref.encode("the quick brown fox")]
    a, _ = model.prefill(ids)
    b, _ = ref.prefill(ids)
    assert a.dtype == np.float32
    assert np.abs(a - b).max() < tol * np.abs(b).max()
    assert np.abs(a - b).max() > 0  # really a different graph
    if "quantize" in variant:
        import onnx

        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert ops & QUANT_OPS[variant["quantize"]]
        weights = {i.name for i in graph.initializer}
        fp32_weight_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights]
        assert not fp32_weight_matmuls  # every weight MatMul was quantized


def test_bad_export_arguments(tmp_path):
    with pytest.raises(ExportError, match="does not exist|not a Hugging Face"):
        export(str(tmp_path), tmp_path / "out", log=lambda m: None)
    with pytest.raises(ExportError, match="fp16"):
        export("smollm2-135m", tmp_path / "out", quantize="int8", dtype="fp16", log=lambda m: None)


def test_graph_choice(tiny_exports, tmp_path):
    """auto = lean where supported; an explicit lean is refused where it cannot apply, in one line."""
    llama, gpt2 = str(tiny_exports["llama"]["hf"]), str(tiny_exports["gpt2"]["hf"])
    with pytest.raises(ExportError, match="does not support this model .*model_type 'gpt2'|does not support this model"):
        export(gpt2, tmp_path / "a", graph="lean", log=lambda m: None)
    with pytest.raises(ExportError, match="opset 23"):
        export(llama, tmp_path / "b", graph="lean", opset=17, log=lambda m: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    manifest = export(llama, tmp_path / "c", opset=17, log=lambda m: None)  # an explicit opset keeps Optimum
    assert manifest.graph == "optimum" and manifest.opset == 17


def test_q4_1_weights_packed_unless_asked(tmp_path):
    """A model whose Linear weights are Q4_1 blocks (what a Q4_1 GGUF loads as) exports with its
    products packed to 4 bits by default; `pack=False` (CLI --unpacked) and int8 quantization
    store them otherwise. The manifest says how many were packed."""
    import onnx
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from epic_ort.cli.main import main
    from tiny_models import build_hf_model, quantize_linears_q4_1

    hf = tmp_path / "hf"
    model = build_hf_model("llama", hf, seed=3)
    quantize_linears_q4_1(model)
    model.save_pretrained(str(hf))
    assert AutoModelForCausalLM.from_pretrained(str(hf)).model.layers[0].mlp.up_proj.weight.unique().numel() < 4096

    def ops(folder):
        return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]

    packed = export(str(hf), tmp_path / "packed", log=lambda m: None)
    assert packed.extra["packed_products"] == 8 and ops(tmp_path / "packed").count("MatMulNBits") == 8
    result = CliRunner().invoke(main, ["export", str(hf), str(tmp_path / "unpacked"), "--unpacked"])
    assert result.exit_code == 0, result.output
    unpacked = epic_ort.runtime.manifest.read_manifest(tmp_path / "unpacked")
    assert unpacked.extra["packed_products"] == 0 and "MatMulNBits" not in ops(tmp_path / "unpacked")
    int8 = export(str(hf), tmp_path / "int8", quantize="int8", log=lambda m: None)
    assert int8.extra["packed_products"] == 0 and int8.quantization == "int8"

    ids = [[5, 9, 12, 7, 20, 3]]
    a, _ = epic_ort.load(tmp_path / "packed", provider="cpu").prefill(ids)
    b, _ = epic_ort.load(tmp_path / "unpacked", provider="cpu").prefill(ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_unknown_model_fails_fast_in_one_line(tmp_path):
    """A name that is neither a folder nor an alias, with no hub to ask (this test environment has
    no network), ends in one error line naming the known aliases: no minute of hub retries, no
    connection noise, no traceback, no output folder."""
    import subprocess
    import sys

    from epic_ort.export import alias_names

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "epic_ort.cli.main", "export", "no-such-model-alias", str(out)],
                            capture_output=True, text=True, timeout=20)  # a hang guard, not a speed assertion
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("epic-ort: error:"), result.stderr
    assert "no-such-model-alias" in lines[0] and all(a in lines[0] for a in alias_names())
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists() and not list(tmp_path.iterdir())


def test_hub_id_goes_to_the_hub_when_it_answers(monkeypatch):
    """Where the hub answers (here a local HTTP server standing in for HF_ENDPOINT), a hub id is
    passed on to from_pretrained as before; offline, a hub id the local cache holds is loaded
    from it alone."""
    import http.server
    import threading

    import huggingface_hub

    from epic_ort.export import resolve_source

    class Quiet(http.server.BaseHTTPRequestHandler):  # answers 501 to everything, silently
        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        assert resolve_source("some-org/some-model") == ("some-org/some-model", {}, "hub:some-org/some-model")
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="known alias .*smollm2-135m.*HF_HUB_OFFLINE is set"):
        resolve_source("some-org/some-model")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert resolve_source("some-org/some-model")[1] == {"local_files_only": True}
    with pytest.raises(ExportError, match="not a hub id"):
        resolve_source("not a name!")
