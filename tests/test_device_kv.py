"""Caches of OrtValues (how every GPU provider returns them) are forked and extended by small ONNX
graphs on the model's own provider (runtime/device_kv.py), never copied through NumPy. On the CPU EP
the same code runs, so the graphs, the dispatch in KVCache and EPIC's tokens are all checked here."""

from __future__ import annotations

import numpy as np
import pytest

import epic_ort
from epic_ort.runtime import cache as cache_module
from epic_ort.runtime import device_kv
from epic_ort.runtime.device_kv import DeviceKV

OPS = ("select", "blocks", "columns", "append", "concat")


@pytest.mark.parametrize("op", OPS)
def test_graphs_pass_the_onnx_checker(op):
    onnx = pytest.importorskip("onnx")
    for elem in (1, 10):  # float32, float16
        onnx.checker.check_model(onnx.load_from_string(device_kv._graph(op, 3, 2, elem)), full_check=True)


def test_negative_attributes_and_symbolic_shapes_encode_as_onnx_reads_them():
    onnx = pytest.importorskip("onnx")
    from epic_ort.runtime.onnx_proto import Node, model_bytes

    m = onnx.load_from_string(model_bytes([Node("Gather", ["x", "i"], ["y"], {"axis": -1}, {"perm": [2, -3]})],
                                          [("x", 1, 3), ("i", 7, 1)], [("y", 1, 3)]))
    attrs = {a.name: a for a in m.graph.node[0].attribute}
    assert attrs["axis"].i == -1 and list(attrs["perm"].ints) == [2, -3]
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["x_d0", "x_d1", "x_d2"]
    assert m.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_device_operations_skip_tensorrt():
    """TensorRT would build an engine for each new fork shape; the forks run on CUDA beside it."""
    ops = DeviceKV([("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {"device_id": 0}),
                    "CPUExecutionProvider"], "cuda", lambda: None)
    assert ops.providers == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


def _ops() -> DeviceKV:
    import onnxruntime as ort

    return DeviceKV(["CPUExecutionProvider"], "cpu", ort.SessionOptions)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_operation_equals_its_numpy_definition(dtype, seed):
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    rows, heads, length, dim = rng.integers(1, 5), rng.integers(1, 4), rng.integers(1, 7), rng.integers(1, 6)
    xs = [rng.standard_normal((rows, heads, length, dim)).astype(dtype) for _ in range(3)]
    ov = [ort.OrtValue.ortvalue_from_numpy(x) for x in xs]
    ops = _ops()
    idx = rng.integers(0, rows, size=rng.integers(1, 6))
    block_rows = rng.integers(0, rows, size=(rng.integers(1, 4), rng.integers(1, 4)))
    r, s = rng.integers(0, rows, size=5), rng.integers(0, length, size=5)
    cols = [rng.standard_normal((rows, heads, 1, dim)).astype(dtype) for _ in xs]
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(ops.select(ov, idx)[i].numpy(), x[idx])
        ref = np.concatenate([x[block_rows[:, b]] for b in range(block_rows.shape[1])], axis=2)
        np.testing.assert_array_equal(ops.blocks(ov, block_rows)[i].numpy(), ref)
        np.testing.assert_array_equal(ops.columns(ov, r, s)[i], x[r, :, s])
        np.testing.assert_array_equal(ops.append(ov, cols)[i].numpy(), np.concatenate([x, cols[i]], axis=2))
        np.testing.assert_array_equal(ops.concat([ov, ov[::-1]])[i].numpy(), np.concatenate([x, xs[::-1][i]]))
    assert all(isinstance(v, ort.OrtValue) for v in ops.select(ov, idx))  # stays where it was


def _as_on_a_gpu(model, monkeypatch) -> None:
    """Run `model` on the CPU EP the way a GPU provider runs it: no in-place cache writes, no
    preallocated host buffers, every cache an OrtValue; and fail on any copy of an OrtValue cache
    tensor to NumPy (what a device cache must never need)."""
    monkeypatch.setattr(type(model), "kv_in_place", property(lambda self: False))
    monkeypatch.setattr(type(model), "forks_on_device", property(lambda self: True))
    step = type(model).step
    monkeypatch.setattr(type(model), "step", lambda self, t, c, present_buffers=None: step(self, t, c))
    real = cache_module.as_numpy

    def guarded(v):
        if not isinstance(v, np.ndarray):
            raise AssertionError("an OrtValue cache tensor was copied to the host")
        return real(v)

    monkeypatch.setattr(cache_module, "as_numpy", guarded)


def _run(model, alpha: float, prompts=("the cat", "a dog ran far", "x")):
    cfg = epic_ort.GenerationConfig(max_new_tokens=24, seed=5, top_k=0, top_p=1.0, alpha=alpha, horizon=3, rollouts=2)
    return sorted((s.prompt_index, s.sample_index, s.token_ids, s.finish_reason)
                  for s in epic_ort.generate(model, list(prompts), cfg, num_samples=2, batch_size=6))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_token_trees_run_on_a_device_cache_without_host_copies(tiny_llama, monkeypatch, alpha):
    """The lean graph as a GPU runs it: the same tokens as the in-place CPU path (plain sampling and
    EPIC's token trees, rows finishing at different steps), every fork through the device graphs."""
    assert tiny_llama.kv_in_place and tiny_llama.supports_trees
    in_place = _run(tiny_llama, alpha)
    _as_on_a_gpu(tiny_llama, monkeypatch)
    before = tiny_llama.device_ops.runs
    assert _run(tiny_llama, alpha) == in_place
    assert tiny_llama.device_ops.runs > before


def test_forked_lookahead_keeps_optimum_caches_on_the_device(tiny_exports, monkeypatch):
    """Optimum's graph (no token trees) forks each candidate's prefix and tiles it to R rollout rows:
    on OrtValues that stays in ORT's memory too, and the tokens are those of the host path."""
    model = epic_ort.load(tiny_exports["llama-optimum"]["onnx"], provider="cpu")
    assert not model.kv_in_place and not model.supports_trees
    on_host = _run(model, 0.6)
    _as_on_a_gpu(model, monkeypatch)
    assert _run(model, 0.6) == on_host
    assert model.device_ops.runs > 0
