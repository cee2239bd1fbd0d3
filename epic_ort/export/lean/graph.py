"""Writing an ONNX graph by hand: nodes, initializers, the shape of every tensor, and saving.

Nothing here knows about transformers or about a model's layout; the builders of the lean
graph (prelude.py, layers.py) call `GraphBuilder.op` for each node they add.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 23  # RMSNormalization and RotaryEmbedding are standard ops from opset 23 on
MS_DOMAIN = "com.microsoft"
# Above this many bytes of weights they go to `<name>.data` beside the graph: protobuf refuses
# messages over 2 GB. Read at save time, so a test can lower it.
MAX_PROTO_BYTES = 1_800_000_000

# Symbolic dimensions of the graph's inputs and outputs (what ORT's shape errors and the
# runtime's IO binding see).
BATCH, SEQ, CAPACITY = "batch_size", "sequence_length", "capacity"
TOTAL = "past_length + sequence_length"
LOGITS = "logits_count"
PRESENT = "present_length"
# --dtype -> the element type of the graph's activations, weights and KV cache (logits stay float32)
FLOAT_TYPES = {"fp32": np.float32, "fp16": np.float16}


class NarrowingError(ValueError):
    """A float32 constant has no finite value in the graph's float type (fp16 tops out at 65504)."""


class GraphBuilder:
    """Nodes, initializers and the type/shape of every intermediate tensor. The shapes go into
    value_info: onnx's shape inference stops at com.microsoft ops, and ORT's quantizer needs the
    element type of every MatMul output.

    `float_type` is the graph's one floating type: every float32 constant is stored in it and every
    node output declared without a `dtype` has it. The builders write float32 numbers and never
    think about fp16; a constant that does not fit (MASKED_SCORE's -1e30 would be -inf) is refused
    here rather than turning into a NaN at run time."""

    def __init__(self, float_type: Any = np.float32) -> None:
        from onnx import helper

        self.helper = helper
        self.float_np = np.dtype(float_type)
        self.float_elem = helper.np_dtype_to_tensor_dtype(self.float_np)
        self.nodes: list[Any] = []
        self.weights: list[tuple[str, np.ndarray]] = []
        self.value_info: list[Any] = []
        self._shared: set[str] = set()

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        """An initializer; returns its name. float32 values are stored in the graph's float type."""
        a = np.asarray(value, dtype=dtype)
        if a.dtype == np.float32 and self.float_np != a.dtype:
            a = self._narrow(name, a)
        self.weights.append((name, np.ascontiguousarray(a)))
        return name

    def _narrow(self, name: str, a: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # an overflow is reported below, with the initializer's name
            out = a.astype(self.float_np, order="C")
        if not np.isfinite(out).all() and np.isfinite(a).all():
            raise NarrowingError(f"initializer {name} does not fit in {self.float_np} (largest magnitude "
                             f"{float(np.abs(a).max()):.3g}); export with --dtype fp32")
        return out

    def shared_const(self, name: str, value: Any, dtype: Any = np.int64) -> str:
        """An initializer several nodes read, written on first use only: ONNX Runtime warns on
        stderr about an initializer no node reads, so constants that only some graphs need
        (the 4-bit products') must not be written up front."""
        if name not in self._shared:
            self._shared.add(name)
            self.const(name, value, dtype)
        return name

    def op(self, op_type: str, name: str, inputs: list[str], shapes: list[Any], outputs: list[str] | None = None,
           dtype: int | None = None, domain: str = "", **attrs: Any) -> Any:
        """One node called `name`; `shapes` lists each output's shape (None: optional output left out),
        `dtype` their element type (default: the graph's float type). Returns the output name, or the
        list of them."""
        dtype = self.float_elem if dtype is None else dtype
        outs = outputs or [f"{name}/out{i}" for i in range(len(shapes))]
        outs = [o if shape is not None else "" for o, shape in zip(outs, shapes)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        for o, shape in zip(outs, shapes):
            if o and shape is not None:
                self.value_info.append(self.helper.make_tensor_value_info(o, dtype, shape))
        return outs[0] if len(outs) == 1 else outs

    def model(self, name: str, inputs: list[Any], outputs: list[Any], opset: int, metadata: dict[str, str]) -> Any:
        """The ModelProto of the nodes so far (initializers are attached by `save`)."""
        helper = self.helper
        io_names = {v.name for v in inputs + outputs}
        graph = helper.make_graph(self.nodes, name, inputs, outputs,
                                  value_info=[v for v in self.value_info if v.name not in io_names])
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="epic_ort.export.lean",
        )
        helper.set_model_props(model, metadata)
        return model


def check(model: Any, weights: list[tuple[str, np.ndarray]]) -> None:
    """onnx.checker on the graph with stand-ins for its weights (each of its type and rank, but
    no elements): every node, attribute, name and opset is checked without a copy of the weights
    (reading back a 1 GB model.onnx to check it would hold it twice more)."""
    import onnx

    stub = model.__class__()
    stub.CopyFrom(model)
    for name, a in weights:
        stub.graph.initializer.append(onnx.TensorProto(
            name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(a.dtype), dims=[0] * a.ndim))
    onnx.checker.check_model(stub)


def save(model: Any, weights: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Attach the initializers and write the file; over MAX_PROTO_BYTES of weights they go to one
    external data file beside it (aligned, as onnx's own external-data writer does). Empties
    `weights` in the first case: the arrays are in the proto then."""
    import onnx
    from onnx import numpy_helper

    path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(a.nbytes for _, a in weights)
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if total <= MAX_PROTO_BYTES:
        if data_path.exists():
            data_path.unlink()
        _write_streamed(model, weights, path)
        return
    offset = 0
    with open(data_path, "wb") as f:
        for name, a in weights:
            if a.nbytes < 1024:
                model.graph.initializer.append(numpy_helper.from_array(a, name))
                continue
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            model.graph.initializer.append(_external_tensor(name, a, data_name, offset))
            f.write(a.tobytes())
            offset += a.nbytes
        f.flush()
        os.fsync(f.fileno())
    onnx.save_model(model, str(path))


def _write_streamed(model: Any, weights: list[tuple[str, np.ndarray]], path: Path) -> None:
    """model.onnx with the initializers inside, written one tensor at a time, each array's bytes
    straight from its buffer: the bytes of a message are the concatenation of its fields', and a
    repeated field is its entries one after another, so the file is the model without its graph,
    the graph field (its header counts the initializers' bytes), the graph without initializers,
    then each initializer as graph field 5: a TensorProto of name, type and dims followed by its
    raw_data field. What onnx.save writes, in another field order, without the weights' copies in
    the proto and in its serialization (3 GB more for Gemma 3 270M's 1 GB). Empties `weights`."""
    tensors = [(_tensor_head(name, a), a) for name, a in weights]
    graph = model.graph.SerializeToString()
    entries = sum(1 + len(_varint(n)) + n for n in (_tensor_size(h, a) for h, a in tensors))
    head = model.__class__()
    head.CopyFrom(model)
    head.ClearField("graph")
    weights.clear()
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        f.write(b"\x3a" + _varint(len(graph) + entries))  # ModelProto.graph: field 7, length-delimited
        f.write(graph)
        tensors.reverse()
        while tensors:
            h, a = tensors.pop()
            f.write(b"\x2a" + _varint(_tensor_size(h, a)))  # GraphProto.initializer: field 5
            f.write(h)
            f.write(b"\x4a" + _varint(a.nbytes))  # TensorProto.raw_data: field 9
            f.write(memoryview(a).cast("B") if a.nbytes else b"")
            del a
        f.flush()
        os.fsync(f.fileno())


def _tensor_head(name: str, a: np.ndarray) -> bytes:
    """A TensorProto of `a` without its data, serialized (raw_data goes after it: little-endian)."""
    import onnx

    if a.dtype.byteorder == ">" or not a.flags.c_contiguous:
        raise ValueError(f"initializer {name}: a little-endian C-contiguous array is expected")
    t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
    return t.SerializeToString()


def _tensor_size(head: bytes, a: np.ndarray) -> int:
    return len(head) + 1 + len(_varint(a.nbytes)) + a.nbytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _external_tensor(name: str, a: np.ndarray, location: str, offset: int) -> Any:
    import onnx

    t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(a.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t
