"""Cache tensors that live in ORT's memory (a GPU's), forked and extended where they are.

Where a graph cannot write its cache in place (every GPU provider), each step's present tensors are
OrtValues on the device. EPIC forks them all the time: candidates' rows, token-tree units of several
rows side by side, a kept token's key/value column appended. Done through NumPy, every fork copied the
whole cache to the host and back. Here each of those is one call of a tiny ONNX graph (Gather,
Transpose/Reshape, Concat) on the model's own provider, all cache tensors in one run with IO binding:
the cache stays on the device, and only what the host needs (a few key/value columns) comes back.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from .onnx_proto import ELEM_TYPES, NUMPY_ELEM_TYPES, Node, model_bytes

INT64 = ELEM_TYPES["tensor(int64)"]


def _elem_type(v: Any) -> int:
    key = str(v.dtype) if isinstance(v, np.ndarray) else v.data_type()
    table = NUMPY_ELEM_TYPES if isinstance(v, np.ndarray) else ELEM_TYPES
    if key not in table:
        raise TypeError(f"no device cache operations for tensors of type {key}")
    return table[key]


def _graph(op: str, count: int, parts: int, elem: int) -> bytes:
    """The graph of one operation on `count` cache tensors x0.. (y0.. out); `parts`: for concat."""
    xs, ys = [f"x{i}" for i in range(count)], [f"y{i}" for i in range(count)]
    tensors_in, out_rank, small = [(x, elem, 4) for x in xs], 4, []
    if op == "select":  # rows idx of each tensor
        nodes = [Node("Gather", [x, "idx"], [y], {"axis": 0}) for x, y in zip(xs, ys)]
        small = [("idx", INT64, 1)]
    elif op == "blocks":  # [rows, H, L, D] -> rows idx[u, b] side by side: [units, H, blocks * L, D]
        nodes = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            nodes += [Node("Gather", [x, "idx"], [f"g{i}"], {"axis": 0}),
                      Node("Transpose", [f"g{i}"], [f"t{i}"], int_lists={"perm": [0, 2, 1, 3, 4]}),
                      Node("Reshape", [f"t{i}", "shape"], [y])]
        small = [("idx", INT64, 2), ("shape", INT64, 1)]
    elif op == "columns":  # [rows, H, L, D] as [rows * H * L, D]; flat[n, H] picks one column per head
        nodes = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            nodes += [Node("Reshape", [x, "shape"], [f"r{i}"]), Node("Gather", [f"r{i}", "flat"], [y], {"axis": 0})]
        small, out_rank = [("flat", INT64, 2), ("shape", INT64, 1)], 3
    elif op == "append":  # one key/value column more per row
        nodes = [Node("Concat", [x, f"c{i}"], [y], {"axis": 2}) for i, (x, y) in enumerate(zip(xs, ys))]
        tensors_in += [(f"c{i}", elem, 4) for i in range(count)]
    elif op == "concat":  # rows of `parts` caches stacked; inputs x{i}_{p}
        nodes = [Node("Concat", [f"x{i}_{p}" for p in range(parts)], [y], {"axis": 0}) for i, y in enumerate(ys)]
        tensors_in = [(f"x{i}_{p}", elem, 4) for i in range(count) for p in range(parts)]
    else:
        raise ValueError(op)
    return model_bytes(nodes, small + tensors_in, [(y, elem, out_rank) for y in ys])


class DeviceKV:
    """The fork and append operations of KVCache (cache.py) for OrtValue caches, run on the
    model's providers. Sessions are built on first use, one per operation, tensor count and type."""

    def __init__(self, providers: Sequence[Any], device: str, session_options: Callable[[], Any]):
        # not TensorRT: it would build an engine for every new shape, and forks change shape each time
        self.providers = [p for p in providers if _provider_name(p) != "TensorrtExecutionProvider"]
        self.device, self._options = device, session_options
        self._sessions: dict[tuple[str, int, int, int], Any] = {}
        self._lock = threading.Lock()
        self.runs = 0  # calls made: tests check that forks went through here and not the host

    def _session(self, op: str, count: int, elem: int, parts: int = 1) -> Any:
        import onnxruntime as ort

        key = (op, count, parts, elem)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = ort.InferenceSession(_graph(op, count, parts, elem), self._options(),
                                                           providers=self.providers)
            return self._sessions[key]

    def _run(self, op: str, values: Sequence[Any], small: dict[str, np.ndarray], extra: Sequence[Any] = (),
             to_host: bool = False, parts: int = 1) -> list[Any]:
        session = self._session(op, len(values) // parts, _elem_type(values[0]), parts)
        binding = session.io_binding()
        for name, array in small.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        names = [i.name for i in session.get_inputs() if i.name not in small]
        for name, v in zip(names, [*values, *extra]):
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(v))
            else:
                binding.bind_ortvalue_input(name, v)
        for o in session.get_outputs():
            binding.bind_output(o.name, "cpu" if to_host else self.device)
        session.run_with_iobinding(binding)
        self.runs += 1
        out = binding.get_outputs()
        return [o.numpy() for o in out] if to_host else list(out)

    def select(self, values: Sequence[Any], idx: np.ndarray) -> list[Any]:
        """Rows idx (repeats allowed) of each tensor."""
        return self._run("select", values, {"idx": idx})

    def blocks(self, values: Sequence[Any], block_rows: np.ndarray) -> list[Any]:
        """Unit u holds rows block_rows[u, 0], block_rows[u, 1], ... side by side along the slots."""
        _, heads, length, dim = _shape(values[0])
        units, blocks = block_rows.shape
        return self._run("blocks", values, {"idx": block_rows, "shape": np.array([units, heads, blocks * length, dim])})

    def columns(self, values: Sequence[Any], rows: np.ndarray, slots: np.ndarray) -> list[np.ndarray]:
        """Per tensor, the columns [n, H, D] at (rows[i], slots[i]), copied to the host: only these."""
        _, heads, length, dim = _shape(values[0])
        flat = (rows[:, None] * heads + np.arange(heads)[None, :]) * length + slots[:, None]
        return self._run("columns", values, {"flat": flat, "shape": np.array([-1, dim])}, to_host=True)

    def append(self, values: Sequence[Any], columns: Sequence[np.ndarray]) -> list[Any]:
        """Each tensor with its column [rows, H, 1, D] appended after its last slot."""
        return self._run("append", values, {}, extra=[np.ascontiguousarray(c) for c in columns])

    def concat(self, parts: Sequence[Sequence[Any]]) -> list[Any]:
        """The rows of several caches' tensors (same length), stacked in order."""
        flat = [part[i] for i in range(len(parts[0])) for part in parts]
        return self._run("concat", flat, {}, parts=len(parts))


def _provider_name(p: Any) -> str:
    return p[0] if isinstance(p, tuple) else p


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape if isinstance(v, np.ndarray) else v.shape())


def is_device_tensor(v: Any) -> bool:
    return not isinstance(v, np.ndarray)
