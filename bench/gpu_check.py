"""GPU check: greedy parity CUDA (and TensorRT if present) vs CPU, then plain and EPIC timing.

Run through bench/gpu_check.sh on a machine with onnxruntime-gpu and an NVIDIA GPU. Prints one table.
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
    cfg = epic_ort.GenerationConfig(max_new_tokens=tokens, alpha=alpha, horizon=4, rollouts=2, seed=0)
    prompts = (PROMPTS * batch)[:batch]
    list(epic_ort.generate(model, prompts, epic_ort.GenerationConfig(max_new_tokens=4, seed=0), batch_size=batch))
    t = time.perf_counter()
    samples = list(epic_ort.generate(model, prompts, cfg, batch_size=batch))
    dt = time.perf_counter() - t
    n = sum(s.stats["tokens"] for s in samples)
    steps = n / batch
    return dt / steps * 1e3, n / dt, (sum(s.stats.get("forward_passes", 0) for s in samples) / n if alpha else 1.0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    have = available_providers()
    print(f"onnxruntime providers: {', '.join(have)}")
    if "CUDAExecutionProvider" not in have:
        print("no CUDAExecutionProvider: install onnxruntime-gpu on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    cpu = epic_ort.load(args.model_dir, provider="cpu")
    ref = greedy_tokens(cpu, 32)
    rows = []
    providers = ["cuda"] + (["tensorrt"] if "TensorrtExecutionProvider" in have else [])
    for prov in providers:
        t = time.perf_counter()
        model = epic_ort.load(args.model_dir, provider=prov)
        load_s = time.perf_counter() - t
        got = greedy_tokens(model, 32)
        same = sum(a == b for a, b in zip(got, ref))
        for alpha in (0.0, 0.2):
            for batch in (1, 8):
                ms, tps, fwd = timed(model, alpha, batch, args.tokens)
                rows.append((prov, "epic" if alpha else "plain", batch, f"{ms:.1f}", f"{tps:.1f}", f"{fwd:.2f}",
                             f"{same}/{len(ref)}", f"{load_s:.1f}"))
    cpu_ms, cpu_tps, _ = timed(cpu, 0.0, 1, min(args.tokens, 32))
    rows.append(("cpu", "plain", 1, f"{cpu_ms:.1f}", f"{cpu_tps:.1f}", "1.00", "ref", "-"))
    head = ("provider", "mode", "batch", "ms/step", "tokens/s", "fwd/token", "greedy==cpu", "load s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return 0 if all(r[6] in ("ref", f"{len(ref)}/{len(ref)}") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
