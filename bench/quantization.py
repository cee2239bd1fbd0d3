"""Weight encodings and arithmetic (the default export's lossless 4-bit blocks, those blocks in int8
arithmetic, int8 GEMM, weight-only int8, int8 dynamic) against float32 tensors: perplexity change on held-out
text, greedy agreement, speed.

    python bench/quantization.py [--fp32 models/smollm2-135m-unpacked] [--packed models/smollm2-135m]
        [--int8-compute models/smollm2-135m-int8-compute] [--int8-gemm models/smollm2-135m-int8gemm]
        [--int8 models/smollm2-135m-int8]
        [--int8-dynamic models/smollm2-135m-int8-dynamic]
        [--corpus ../shared/data/austen/persuasion.txt] [--windows 16] [--tokens 256] [--greedy-prompts 20]

Exports a variant when its folder is missing. Perplexity is measured on `windows` random
passages of `tokens` tokens (the first half is context, the second half is scored), the same
passages for every model. Greedy agreement: `greedy-prompts` other passages of the same text (32
tokens of context), 32 greedy tokens each, compared with the reference model's (identical
continuations, and the mean length of the common start). The reference is float32 tensors, or the
first of `--variants`. Speed (tokens/s, median of 3 rounds
that alternate the models): plain sampling at batch 1 (64 tokens) and batch 8 (32), EPIC at
batch 1 (alpha 0.2, k 4, R 2, 16 tokens) and batch 8 (8 tokens).
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


PROMPT = "It was a bright cold day in April, and the clocks were striking thirteen. The hall smelt of"
SPEEDS = {"batch 1": (1, 64, 0.0), "batch 8": (8, 32, 0.0), "EPIC batch 1": (1, 16, 0.2), "EPIC batch 8": (8, 8, 0.2)}


def speed(model, batch: int, n: int, alpha: float) -> float:
    cfg = epic_ort.GenerationConfig(max_new_tokens=n, seed=0, alpha=alpha, horizon=4, rollouts=2)
    t = time.perf_counter()
    samples = list(epic_ort.generate(model, [PROMPT] * batch, cfg, batch_size=batch))
    return sum(s.stats["tokens"] for s in samples) / (time.perf_counter() - t)


def speeds(models: dict, rounds: int = 3) -> dict[str, dict[str, float]]:
    """{model: {setting: tokens/s}}, the median of `rounds` rounds that each run every model once."""
    for model in models.values():  # warm-up
        list(epic_ort.generate(model, [PROMPT], epic_ort.GenerationConfig(max_new_tokens=4, seed=0)))
    runs = {name: {label: [] for label in SPEEDS} for name in models}
    for _ in range(rounds):
        for label, setting in SPEEDS.items():
            for name, model in models.items():
                runs[name][label].append(speed(model, *setting))
    return {name: {label: float(np.median(v)) for label, v in r.items()} for name, r in runs.items()}


def greedy(model, prompts) -> list[list[int]]:
    cfg = epic_ort.GenerationConfig(max_new_tokens=32, greedy=True, seed=0)
    return [s.token_ids for s in epic_ort.generate(model, prompt_ids=prompts, config=cfg, batch_size=4)]


def agreement(tokens, reference) -> tuple[int, float]:
    """(continuations identical to the reference, mean length of the common start)."""
    common = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(tokens, reference)]
    return sum(a == b for a, b in zip(tokens, reference)), float(np.mean(common))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", default="models/smollm2-135m-unpacked", help="float32 tensors (export --unpacked)")
    ap.add_argument("--packed", default="models/smollm2-135m", help="the default export (4-bit blocks where exact)")
    ap.add_argument("--int8-compute", default="models/smollm2-135m-int8-compute")
    ap.add_argument("--int8-gemm", default="models/smollm2-135m-int8gemm")
    ap.add_argument("--int8", default="models/smollm2-135m-int8")
    ap.add_argument("--int8-dynamic", default="models/smollm2-135m-int8-dynamic")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/austen/persuasion.txt"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--greedy-prompts", type=int, default=20)
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset, the reference first, e.g. 'fp32 4-bit blocks,int8 compute' "
                         "[default: all, against fp32]")
    args = ap.parse_args()
    folders = {"fp32": args.fp32, "fp32 4-bit blocks": args.packed, "int8 compute": args.int8_compute,
               "int8 GEMM": args.int8_gemm, "int8": args.int8, "int8-dynamic": args.int8_dynamic}
    flags = {"fp32": ["--unpacked"], "fp32 4-bit blocks": [], "int8 compute": ["--compute", "int8"],
             "int8 GEMM": ["--compute", "int8-gemm"], "int8": ["--quantize", "int8"], "int8-dynamic": ["--quantize", "int8-dynamic"]}
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in chosen if v not in folders]
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {list(folders)}")
        folders = {v: folders[v] for v in chosen}
    ref = next(iter(folders))
    for scheme, folder in folders.items():
        if not (Path(folder) / "epic_ort_manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "epic_ort.cli.main", "export", "smollm2-135m", folder, *flags[scheme]],
                           check=True)
    models = {name: epic_ort.load(folder, provider="cpu") for name, folder in folders.items()}
    corpus = load_corpus(models[ref], [args.corpus])
    positions = sample_positions(corpus, args.windows, args.tokens // 2, args.tokens // 2, seed=0)
    starts = sample_positions(corpus, args.greedy_prompts, 32, 32, seed=1)
    prompts = [corpus.bos + corpus.tokens[p - 32: p].tolist() for p in starts]
    reference = greedy(models[ref], prompts)
    measured = speeds(models)
    rows = {}
    for name, model in models.items():
        same, common = agreement(greedy(model, prompts), reference)
        rows[name] = {"perplexity": perplexity(model, corpus, positions, args.tokens), "greedy_identical": same,
                      "greedy_common_start": common, "tokens_per_s": measured[name],
                      "model_mb": (Path(folders[name]) / "model.onnx").stat().st_size / 2**20}
    base = rows[ref]
    print(f"held-out text: {args.corpus} ({args.windows} passages x {args.tokens // 2} scored tokens; greedy: "
          f"{args.greedy_prompts} prompts x 32 tokens)")
    print(f"| model | perplexity | change vs {ref} | greedy = {ref} | common start | "
          + " | ".join(f"{label} tok/s (vs {ref})" for label in SPEEDS) + " | model.onnx MB |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(SPEEDS) + "---:|")
    for name, r in rows.items():
        r["perplexity_change"] = r["perplexity"] / base["perplexity"] - 1
        r["speed_ratio"] = {k: v / base["tokens_per_s"][k] for k, v in r["tokens_per_s"].items()}
        cells = " | ".join(f"{r['tokens_per_s'][k]:.1f} ({r['speed_ratio'][k]:.2f}x)" for k in SPEEDS)
        print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | {r['greedy_identical']}/"
              f"{len(prompts)} | {r['greedy_common_start']:.1f} | {cells} | {r['model_mb']:.0f} |")
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
