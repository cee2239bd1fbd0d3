"""GPU check: greedy parity CUDA (and TensorRT if present) vs CPU, then plain and EPIC timing.

Run through bench/gpu_check.sh on a machine with onnxruntime-gpu and an NVIDIA GPU, on one or more
exports (the fp16 lean graph and Optimum's). Prints one table; "device forks/token" counts the cache
forks run by the provider itself (runtime/device_kv.py): 0 there would mean the cache went through
the host.
"""

from __future__ import annotations

import argparse
import sys
import time


import epic_ort
from epic_ort.runtime.providers import available_providers

PROMPTS = [
    "The old lighthouse keeper looked out over the water and",
    "Photosynthesis is the process by which",
    "In 1815, the Congress of Vienna",
]


def greedy_tokens(model, n):
    cfg = epic_ort.GenerationConfig(max_new_tokens=n, greedy=True)
    out = sorted(epic_ort.generate(model, PROMPTS, cfg, batch_size=len(PROMPTS)), key=lambda s: s.prompt_index)
    return [s.token_ids for s in out]


def timed(model, alpha, batch, tokens):
    """ms per step, tokens/s, forward passes per token, device forks per token."""
    cfg = epic_ort.GenerationConfig(max_new_tokens=tokens, alpha=alpha, horizon=4, rollouts=2, seed=0)
    prompts = (PROMPTS * batch)[:batch]
    list(epic_ort.generate(model, prompts, epic_ort.GenerationConfig(max_new_tokens=4, seed=0), batch_size=batch))
    t, forks = time.perf_counter(), model.device_ops.runs
    samples = list(epic_ort.generate(model, prompts, cfg, batch_size=batch))
    dt = time.perf_counter() - t
    n = sum(s.stats["tokens"] for s in samples)
    steps = n / batch
    fwd = sum(s.stats.get("forward_passes", 0) for s in samples) / n if alpha else 1.0
    return dt / steps * 1e3, n / dt, fwd, (model.device_ops.runs - forks) / n


def check(model_dir: str, have: list[str], batches: list[int], tokens: int) -> list[tuple]:
    cpu = epic_ort.load(model_dir, provider="cpu")
    ref = greedy_tokens(cpu, 32)
    rows = []
    for prov in ["cuda"] + (["tensorrt"] if "TensorrtExecutionProvider" in have else []):
        t = time.perf_counter()
        model = epic_ort.load(model_dir, provider=prov)
        load_s = time.perf_counter() - t
        same = sum(a == b for a, b in zip(greedy_tokens(model, 32), ref))
        for alpha in (0.0, 0.2):
            for batch in batches:
                ms, tps, fwd, forks = timed(model, alpha, batch, tokens)
                rows.append((model_dir, prov, "epic" if alpha else "plain", batch, f"{ms:.1f}", f"{tps:.1f}",
                             f"{fwd:.2f}", f"{forks:.2f}", f"{same}/{len(ref)}", f"{load_s:.1f}"))
    cpu_ms, cpu_tps, _, _ = timed(cpu, 0.0, 1, min(tokens, 32))
    rows.append((model_dir, "cpu", "plain", 1, f"{cpu_ms:.1f}", f"{cpu_tps:.1f}", "1.00", "-", "ref", "-"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    args = ap.parse_args()
    have = available_providers()
    print(f"onnxruntime providers: {', '.join(have)}")
    if "CUDAExecutionProvider" not in have:
        print("no CUDAExecutionProvider: install onnxruntime-gpu on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    rows = [r for d in args.model_dirs for r in check(d, have, batches, args.tokens)]
    head = ("model", "provider", "mode", "batch", "ms/step", "tokens/s", "fwd/token", "device forks/token",
            "greedy==cpu", "load s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |", flush=True)
    return 0 if all(r[8] in ("ref", "3/3") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
