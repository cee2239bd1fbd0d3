"""Weight encodings (the default export's lossless 4-bit blocks, weight-only int8, int8 dynamic) against
float32 tensors: speed and perplexity change on held-out text.

    python bench/quantization.py [--fp32 models/smollm2-135m-unpacked] [--packed models/smollm2-135m]
        [--int8 models/smollm2-135m-int8] [--int8-dynamic models/smollm2-135m-int8-dynamic]
        [--corpus ../shared/data/austen/persuasion.txt] [--windows 16] [--tokens 256]

Exports a variant when its folder is missing. Perplexity is measured on `windows` random
passages of `tokens` tokens (the first half is context, the second half is scored), the same
passages for both models; speed is plain sampling tokens/s at batch 1 (64 tokens, seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import epic_ort
from epic_ort.calibration.corpus import load_corpus, sample_positions
from epic_ort.scoring import score_continuations


def perplexity(model, corpus, positions, tokens):
    half = tokens // 2
    prompts = [corpus.bos + corpus.tokens[p - half : p].tolist() for p in positions]
    conts = [corpus.tokens[p : p + half].tolist() for p in positions]
    losses = np.concatenate([ll for _, ll in score_continuations(model, prompts, conts, batch_size=4)])
    return math.exp(float(losses.mean()))


def speed(model, n=64):
    cfg = epic_ort.GenerationConfig(max_new_tokens=n, seed=0, top_k=0)
    prompt = "It was a bright cold day in April, and the clocks were striking thirteen. The hall smelt of"
    list(epic_ort.generate(model, [prompt], epic_ort.GenerationConfig(max_new_tokens=4, seed=0)))
    t = time.perf_counter()
    (s,) = list(epic_ort.generate(model, [prompt], cfg))
    return s.stats["tokens"] / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", default="models/smollm2-135m-unpacked", help="float32 tensors (export --unpacked)")
    ap.add_argument("--packed", default="models/smollm2-135m", help="the default export (4-bit blocks where exact)")
    ap.add_argument("--int8", default="models/smollm2-135m-int8")
    ap.add_argument("--int8-dynamic", default="models/smollm2-135m-int8-dynamic")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/austen/persuasion.txt"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    folders = {"fp32": args.fp32, "fp32 4-bit blocks": args.packed, "int8": args.int8, "int8-dynamic": args.int8_dynamic}
    flags = {"fp32": ["--unpacked"], "fp32 4-bit blocks": [], "int8": ["--quantize", "int8"],
             "int8-dynamic": ["--quantize", "int8-dynamic"]}
    for scheme, folder in folders.items():
        if not (Path(folder) / "epic_ort_manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "epic_ort.cli.main", "export", "smollm2-135m", folder, *flags[scheme]],
                           check=True)
    models = {name: epic_ort.load(folder, provider="cpu") for name, folder in folders.items()}
    corpus = load_corpus(models["fp32"], [args.corpus])
    positions = sample_positions(corpus, args.windows, args.tokens // 2, args.tokens // 2, seed=0)
    rows = {}
    for name, model in models.items():
        rows[name] = {
            "perplexity": perplexity(model, corpus, positions, args.tokens),
            "tokens_per_s": speed(model),
            "model_mb": (Path(folders[name]) / "model.onnx").stat().st_size / 2**20,
        }
    for r in rows.values():
        r["perplexity_change"] = r["perplexity"] / rows["fp32"]["perplexity"] - 1
        r["speed_ratio"] = r["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
    print(f"held-out text: {args.corpus} ({args.windows} passages x {args.tokens // 2} scored tokens)")
    print("| model | perplexity | change vs fp32 | tokens/s (batch 1) | speed vs fp32 | model.onnx MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | {r['tokens_per_s']:.1f} | "
              f"{r['speed_ratio']:.2f}x | {r['model_mb']:.0f} |")
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
