"""Just enough of the ONNX protobuf format to write small graphs without the `onnx` package.

The runtime builds a few one-operator graphs of its own (device_kv.py) to move cache tensors where
they live. `onnx` is an export-time dependency; the runtime needs only onnxruntime, so these few
messages are encoded here by hand (field numbers from onnx/onnx.proto, proto2 wire format).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

IR_VERSION = 8  # onnxruntime >= 1.14 reads it
OPSET = 17

ELEM_TYPES = {"tensor(float)": 1, "tensor(int64)": 7, "tensor(float16)": 10, "tensor(bfloat16)": 16}
NUMPY_ELEM_TYPES = {"float32": 1, "int64": 7, "float16": 10}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: negatives as 64-bit two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _bytes(num: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint((num << 3) | 2) + _varint(len(data)) + data


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    ints: dict[str, int] = field(default_factory=dict)
    int_lists: dict[str, Sequence[int]] = field(default_factory=dict)

    def encode(self) -> bytes:
        out = b"".join(_bytes(1, i) for i in self.inputs) + b"".join(_bytes(2, o) for o in self.outputs)
        out += _bytes(3, f"{self.op_type}_{self.outputs[0]}") + _bytes(4, self.op_type)
        for name, value in self.ints.items():  # AttributeProto: name 1, i 3, type 20 (INT = 2)
            out += _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, 2))
        for name, values in self.int_lists.items():  # ints 8, type INTS = 7
            out += _bytes(5, _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7))
        return out


Value = tuple[str, int, int]  # a graph input or output: name, ONNX element type, rank


def _value_info(name: str, elem_type: int, rank: int) -> bytes:
    """ValueInfoProto of a tensor whose dimensions are all symbolic (d0, d1, ...)."""
    shape = b"".join(_bytes(1, _bytes(2, f"{name}_d{i}")) for i in range(rank))
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, elem_type) + _bytes(2, shape)))


def model_bytes(nodes: Sequence[Node], inputs: Sequence[Value], outputs: Sequence[Value],
                name: str = "epic_ort_runtime") -> bytes:
    """A serialized ModelProto of one graph."""
    graph = b"".join(_bytes(1, n.encode()) for n in nodes) + _bytes(2, name)
    graph += b"".join(_bytes(11, _value_info(*v)) for v in inputs)
    graph += b"".join(_bytes(12, _value_info(*v)) for v in outputs)
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(2, "epic-ort") + _bytes(7, graph) + _bytes(8, opset)
