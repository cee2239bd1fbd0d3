"""Perplexity of `--compute int8-gemm` exports at several smoothing strengths (export/lean/smoothing.py),
each built from one loaded SmolLM2 and scored like bench/quantization.py (passages of 256 tokens, the
second half scored, seed 0). Choose the strength on a text that is not the one the figures are reported on.

    python bench/smoothing_strength.py --strengths 0.5,0.6,0.7,0.8,0.9 \\
        --corpora ../shared/data/austen/mansfield_park.txt [--windows 48] [--work /tmp/smoothing]

Needs the `export` extra. The default export (models/smollm2-135m, exported if missing) is the reference.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import warnings
from pathlib import Path


import epic_ort
from epic_ort.calibration.corpus import load_corpus, sample_positions
from quantization import perplexity

REFERENCE = Path("models/smollm2-135m")


def build_variants(strengths: list[float], work: Path) -> dict[float, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epic_ort.export.lean import build_lean_onnx, projection, smoothing
    from epic_ort.export.sources import opened_source, resolve_source

    with opened_source("smollm2-135m", resolve_source("smollm2-135m")) as src:
        tokenizer = src.tokenizer or AutoTokenizer.from_pretrained(src.path, **src.kwargs)
        hf = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, **src.kwargs).eval()
    peaks = smoothing.activation_peaks(hf, smoothing.smoothing_text_ids(tokenizer))
    folders = {}
    for a in strengths:
        folders[a] = work / f"strength-{a}"
        shutil.copytree(REFERENCE, folders[a], dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.onnx*"))
        projection.smoothing_scales = functools.partial(smoothing.smoothing_scales, strength=a)
        build_lean_onnx(hf, folders[a] / "model.onnx", compute="int8-gemm", peaks=peaks)
    return folders


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strengths", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--corpora", required=True, help="comma-separated text files")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--work", default="/tmp/smoothing")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if not (REFERENCE / "epic_ort_manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "epic_ort.cli.main", "export", "smollm2-135m", str(REFERENCE)], check=True)
    folders = {"default": REFERENCE, **build_variants([float(s) for s in args.strengths.split(",")], Path(args.work))}
    corpora = args.corpora.split(",")
    table: dict = {}
    for name, folder in folders.items():
        model = epic_ort.load(folder, provider="cpu")
        for path in corpora:
            corpus = load_corpus(model, [path])
            positions = sample_positions(corpus, args.windows, 128, 128, seed=0)
            table[name, path] = perplexity(model, corpus, positions, 256)
    print("| strength | " + " | ".join(f"{Path(p).stem} | vs default" for p in corpora) + " |")
    print("|---:|" + "---:|---:|" * len(corpora))
    for name in folders:
        cells = " | ".join(f"{table[name, p]:.3f} | {table[name, p] / table['default', p] - 1:+.2%}" for p in corpora)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
