"""Which CPU kernel wins at which number of rows: one product of SmolLM2's shape ([rows, 576] @ [576, 1536]),
as float32 MatMul, as 4-bit MatMulNBits in float32 (accuracy_level 0, the default export) and in int8
(accuracy_level 4, `export --compute int8`), and as ONNX Runtime's int8 GEMM (MatMulInteger: uint8
activations quantized per row, int8 weights per column; VNNI or AMX tiles in MLAS where the CPU has them).

    python bench/int8_kernels.py [--threads 1] [--rows 1,4,16,64,256,512] [--k 576] [--n 1536]

Why: EPIC's lookahead calls carry 10-400 tokens, plain decoding one per row. Whether int8 arithmetic pays for
them depends on the CPU's kernels, so the export's `--compute` choice is read off this table, per machine.
Each kernel's time is the mean over repeated calls after a warm-up, printed as a ratio to float32 at the
same row count, measured in the same run. The last column is the int8 GEMM's error against float32.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 32


def graph(nodes, inits, k: int, n: int):
    g = helper.make_graph(nodes, "product", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                          [numpy_helper.from_array(v, name) for name, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def float_product(w: np.ndarray):
    return graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], {"W": w}, *w.shape)


def four_bit_product(w: np.ndarray, accuracy_level: int):
    """Symmetric 4-bit blocks of 32 along K (levels q - 8, one scale a block)."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // BLOCK, BLOCK)
    scales = np.maximum(np.abs(blocks).max(-1), 1e-12) / 7
    q = (np.clip(np.round(blocks / scales[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=BLOCK, accuracy_level=accuracy_level)
    return graph([node], {"B": packed, "S": scales.reshape(-1).astype(np.float32)}, k, n)


def int8_gemm_product(w: np.ndarray):
    """y = (s_row * s_col) * ((round(x / s_row) + 128) - 128) @ q(w): per-row activation scales."""
    k, n = w.shape
    w_scale = np.maximum(np.abs(w).max(0), 1e-12) / 127
    inits = {"W": np.clip(np.round(w / w_scale), -127, 127).astype(np.int8), "w_scale": w_scale.astype(np.float32),
             "axis": np.array([-1], np.int64), "inv127": np.array(1 / 127, np.float32),
             "tiny": np.array(1e-30, np.float32), "shift": np.array(128, np.float32), "zero": np.array(128, np.uint8)}
    op = helper.make_node
    nodes = [op("Abs", ["A"], ["abs"]), op("ReduceMax", ["abs", "axis"], ["max"], keepdims=1),
             op("Mul", ["max", "inv127"], ["s0"]), op("Max", ["s0", "tiny"], ["s"]), op("Div", ["A", "s"], ["a"]),
             op("Add", ["a", "shift"], ["a128"]), op("Round", ["a128"], ["ar"]),
             op("Cast", ["ar"], ["aq"], to=TensorProto.UINT8), op("MatMulInteger", ["aq", "W", "zero"], ["yi"]),
             op("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT), op("Mul", ["yf", "s"], ["ys"]),
             op("Mul", ["ys", "w_scale"], ["Y"])]
    return graph(nodes, inits, k, n)


def cpu() -> str:
    """The CPU's name and the int8 features MLAS can use (Linux; the machine type elsewhere)."""
    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(features)})"


def mean_seconds(session: ort.InferenceSession, a: np.ndarray, budget: float = 0.3) -> float:
    for _ in range(3):
        session.run(None, {"A": a})
    calls, start = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - start < budget:
        session.run(None, {"A": a})
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,16,64,256,512")
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.k, args.n)) * 0.05).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    kernels = {"float32 MatMul": float_product(w), "4-bit, accuracy 0": four_bit_product(w, 0),
               "4-bit, accuracy 4": four_bit_product(w, 4), "int8 GEMM, per-row": int8_gemm_product(w)}
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, m in kernels.items()}
    print(f"{cpu()}, onnxruntime {ort.__version__}, {args.threads} thread(s), "
          f"[rows, {args.k}] @ [{args.k}, {args.n}]; time ÷ float32 MatMul at the same rows")
    print("| rows | float32 µs | " + " | ".join(list(kernels)[1:]) + " | int8 GEMM error |")
    print("|---:|---:|" + "---:|" * len(kernels))
    for rows in (int(r) for r in args.rows.split(",")):
        a = rng.standard_normal((rows, args.k)).astype(np.float32)
        times = {name: mean_seconds(s, a) for name, s in sessions.items()}
        exact = a @ w
        error = np.abs(sessions["int8 GEMM, per-row"].run(None, {"A": a})[0] - exact).max() / np.abs(exact).max()
        base = times["float32 MatMul"]
        cells = " | ".join(f"{times[name] / base:.2f}" for name in list(kernels)[1:])
        print(f"| {rows} | {base * 1e6:.0f} | {cells} | {error:.1e} |")


if __name__ == "__main__":
    main()
