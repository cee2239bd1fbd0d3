#!/usr/bin/env python
"""Benchmark epic-ort against transformers, Optimum and llama.cpp on one machine, one prompt, one setting.

    python bench/run.py [--model-dir models/smollm2-135m] [--optimum-dir models/smollm2-135m-optimum]
        [--quick] [--out bench/out]

Measures (see bench/README.md for the details and caveats):
  1. plain sampling tokens/s (top_k=0, temperature 1, fixed seed) of epic-ort, transformers
     (the same GGUF weights the export was made from) and Optimum's ORTModelForCausalLM (on
     Optimum's own export of the same weights, `--optimum-dir`, made with `--graph optimum` on
     first use; epic-ort runs its default export, the lean graph), at each batch size and prompt length,
     and of llama.cpp (llama-cpp-python, an optional build: see bench/README.md) on the same GGUF file
     at batch 1;
  2. EPIC (alpha 0.2, horizon 4, rollouts 2) with epic-ort: time per token relative to epic-ort's
     plain sampling measured in the same worker, forward passes, entropy evaluations and lookahead
     rows per token (mean and 95th percentile over (row, step) pairs);
  3. peak resident memory of each engine/config: each runs in its own worker process
     (`python bench/run.py --worker ENGINE ...`) that reports ru_maxrss as JSON on stdout.

The parent imports neither torch nor onnxruntime: only `tokenizers`, to build the prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from epic_ort.fileio import write_bytes_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import NOTES, add_ratios, plot_results, table  # noqa: E402
from prompts import build_prompts  # noqa: E402
from workers import DEFAULT_ALIAS, EPIC, RESULT_MARK, worker_main  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENGINES = ("epic-ort", "transformers", "optimum", "llama.cpp")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "EPIC_ORT_THREADS")


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, Any]:
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    versions = {}
    for pkg in ("onnxruntime", "torch", "transformers", "optimum", "optimum-onnx", "numpy", "tokenizers", "epic-ort"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    info["threads"] = threads
    return info


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = []
    for p in args.prompt_lengths:
        for b in args.batches:
            for engine in args.only:
                if engine == "llama.cpp" and b != 1:
                    continue  # llama-cpp-python's generate runs one sequence
                jobs.append({"engine": engine, "mode": "plain", "batch": b, "prompt_len": p, "tokens": args.tokens,
                             "repeats": args.repeats})
            if "epic-ort" in args.only and not args.no_epic:
                jobs.append({"engine": "epic-ort", "mode": "epic", "batch": b, "prompt_len": p, "tokens": args.epic_tokens,
                             "repeats": args.epic_repeats})
    return jobs


def run_worker(args: argparse.Namespace, job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", job["engine"], "--mode", job["mode"],
        "--batch", str(job["batch"]), "--prompt-len", str(job["prompt_len"]), "--tokens", str(job["tokens"]),
        "--model-dir", str(args.model_dir), "--optimum-dir", str(args.optimum_dir), "--threads", str(args.threads),
        "--seed", str(args.seed), "--repeats", str(job["repeats"]), "--alias", args.alias,
    ] + (["--warmup-tokens", str(args.warmup_tokens)] if args.warmup_tokens else [])
    cmd += (["--distinct-prompts"] if args.distinct_prompts else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        stdout, stderr, rc = out, err, None
    res = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    if res is None:
        why = f"timed out after {args.worker_timeout}s" if rc is None else f"exited with {rc} and no result"
        res = dict(job, error=f"worker {why}; stderr tail: {stderr.strip()[-600:]}")
    elif "error" in res:
        res["stderr_tail"] = stderr.strip()[-1500:]
    if "error" not in res and (not res.get("prompt_ids_match", True) or set(res.get("prompt_tokens", [])) != {job["prompt_len"]}):
        res["warning"] = f"this engine's tokenizer gave prompt lengths {sorted(set(res.get('prompt_tokens', [])))} / other ids"
    res["worker_seconds"] = time.perf_counter() - t0
    res["command"] = " ".join(cmd)
    return res


def _weights_note(model_dir: str) -> str:
    """How epic-ort's export stores its weights, from its manifest."""
    try:
        manifest = json.loads((Path(model_dir) / "epic_ort_manifest.json").read_text())
    except (OSError, ValueError):
        return ""
    packed = manifest.get("extra", {}).get("packed_products")
    if manifest.get("quantization"):
        return f": {manifest['quantization']}"
    if packed:
        return f": {packed} products kept as the GGUF's exact 4-bit blocks, float32 arithmetic"
    return ": float32 tensors" if packed == 0 else ""


def header_text(info: dict[str, Any], args: argparse.Namespace) -> str:
    v = info["versions"]
    lines = [
        f"Machine: {info['cpu']}, {info['logical_cores']} logical cores"
        + (f" ({info.get('physical_cores')} physical)" if info.get("physical_cores") else "")
        + (f", {info['memory_gb']} GB RAM" if info.get("memory_gb") else "")
        + (f", load average at start {info['load_average']}" if info.get("load_average") else ""),
        f"Python {info['python']}; onnxruntime {v['onnxruntime']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"optimum {v['optimum']} (optimum-onnx {v['optimum-onnx']}), numpy {v['numpy']}",
        f"Threads: every engine uses {args.threads} threads (= all cores): OMP/MKL/OPENBLAS_NUM_THREADS={args.threads}, "
        f"torch.set_num_threads({args.threads}), ONNX Runtime intra_op_num_threads={args.threads}, inter_op_num_threads=1; "
        "engines run one at a time, each in its own process.",
        f"Model: {args.model_dir} (epic-ort{_weights_note(args.model_dir)}), {args.optimum_dir} (Optimum's export of "
        f"the same weights); transformers loads the GGUF of `{args.alias}`, "
        "the file the export was made from, dequantized to float32"
        + ("; llama.cpp runs that GGUF file as it is (batch 1)." if "llama.cpp" in args.only else "."),
        f"Sampling: top_k=0, top_p=1, temperature 1, seed {args.seed}; transformers/Optimum use "
        "min_new_tokens=max_new_tokens; epic-ort has no min_new_tokens, so 'gen. tokens' shows what it produced. "
        f"Prompts: real prose, exactly the stated token count (BOS included); batch rows are "
        + ("distinct prompts of that length." if args.distinct_prompts else "copies of one prompt (epic-ort prefills identical prompts once).")
        + f" Plain: {args.tokens} new tokens; EPIC (alpha {EPIC['alpha']}, horizon {EPIC['horizon']}, rollouts {EPIC['rollouts']}): "
        f"{args.epic_tokens} new tokens. One untimed warm-up per engine/config"
        + (f" ({args.warmup_tokens} tokens)" if args.warmup_tokens else " (same length)")
        + f"; timed runs: {args.repeats} plain, {args.epic_repeats} EPIC+plain pairs in EPIC workers (median). "
        "tokens/s = generated tokens (all rows) / wall time of the generate call, prefill included.",
    ]
    load = info.get("load_average")
    if load and info.get("logical_cores") and load[0] > 0.5 * info["logical_cores"]:
        lines.append(
            f"WARNING: load average {load[0]} on {info['logical_cores']} cores: the machine is busy and the timings are "
            "unreliable (torch's OpenMP threads slow down the most when they share cores); rerun on a quiet machine."
        )
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def worker_env(threads: int) -> dict[str, str]:
    """The workers' environment: every engine on the same thread count, the libraries quiet and offline."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_jobs(args: argparse.Namespace, jobs: list[dict[str, Any]], env: dict[str, str]) -> list[dict[str, Any]]:
    results = []
    for i, job in enumerate(jobs, 1):
        label = f"[{i}/{len(jobs)}] {job['engine']} {job['mode']} batch {job['batch']} prompt {job['prompt_len']} tokens {job['tokens']}"
        print(label + " ...", file=sys.stderr, flush=True)
        res = run_worker(args, job, env)
        results.append(res)
        if "warning" in res:
            print(f"    WARNING: {res['warning']}", file=sys.stderr, flush=True)
        if "error" in res:
            print(f"    FAILED: {res['error']}", file=sys.stderr, flush=True)
        else:
            print(f"    {res['tokens_per_s']:.1f} tokens/s, peak RSS {res['peak_rss_mb']:.0f} MB ({res['worker_seconds']:.0f}s)", file=sys.stderr, flush=True)
    return results


def parent_main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    for name in ("model.onnx", "tokenizer.json", "config.json"):
        if not (model_dir / name).is_file():
            print(f"error: {model_dir / name} is missing; export with `epic-ort export {args.alias} {model_dir}`", file=sys.stderr)
            return 2
    if "optimum" in args.only and not (Path(args.optimum_dir) / "model.onnx").is_file():
        print(f"exporting Optimum's graph for the Optimum anchor into {args.optimum_dir}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "epic_ort.cli.main", "export", args.alias, str(args.optimum_dir),
                        "--graph", "optimum"], check=True)
    info = machine_info(args.threads)
    header = header_text(info, args)
    print(header, flush=True)
    # build (and check) every prompt here once, so a prompt problem fails fast, not in every worker
    for p in args.prompt_lengths:
        count = max(args.batches) if args.distinct_prompts else 1
        build_prompts(model_dir / "tokenizer.json", p, count)
    t_all = time.perf_counter()
    results = run_jobs(args, plan(args), worker_env(args.threads))
    add_ratios(results)
    md_table = table(results)
    print()
    print(md_table)
    print()
    print(NOTES)
    out = Path(args.out)
    doc = {
        "machine": info,
        "settings": {
            "model_dir": str(args.model_dir), "optimum_dir": str(args.optimum_dir), "quick": args.quick, "engines": args.only, "batches": args.batches,
            "prompt_lengths": args.prompt_lengths, "tokens": args.tokens, "epic_tokens": args.epic_tokens,
            "epic": EPIC, "threads": args.threads, "seed": args.seed, "repeats": args.repeats,
            "epic_repeats": args.epic_repeats, "warmup_tokens": args.warmup_tokens,
            "distinct_prompts": args.distinct_prompts,
        },
        "total_seconds": time.perf_counter() - t_all,
        "results": results,
    }
    _write_atomic(out / "results.json", json.dumps(doc, indent=2) + "\n")
    try:
        png = plot_results(results)
    except ImportError:
        figure = "(no plot: matplotlib is not installed; pip install 'epic-ort[plot]')"
    else:
        write_bytes_atomic(out / "results.png", png)
        figure = "![plain tokens/s and EPIC's cost](results.png)"
    _write_atomic(out / "results.md", "# epic-ort benchmark\n\n" + header.replace("\n", "\n\n") + "\n\n" + md_table
                  + "\n\n" + figure + "\n\n" + NOTES + "\n")
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'results.png'}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(",", " ").split()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(REPO / "models" / "smollm2-135m"))
    ap.add_argument("--alias", default=DEFAULT_ALIAS,
                    help="the export alias --model-dir was made from: transformers and llama.cpp run its GGUF file")
    ap.add_argument("--optimum-dir", default=str(REPO / "models" / "smollm2-135m-optimum"),
                    help="Optimum's own export of the model, for the Optimum anchor (exported if missing)")
    ap.add_argument("--quick", action="store_true", help="16 plain / 8 EPIC tokens, batch 1 and 8, prompt 32 only")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--only", default=None,
                    help="engines, comma-separated: epic-ort,transformers,optimum,llama.cpp [default: all; llama.cpp "
                         "where llama-cpp-python is installed]")
    ap.add_argument("--batches", type=_ints, default=None, help="e.g. 1,8 (default 1,8)")
    ap.add_argument("--prompt-lengths", type=_ints, default=None, help="e.g. 32,512 (default 32,512; quick 32)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens, plain sampling (default 128; quick 16)")
    ap.add_argument("--epic-tokens", type=int, default=None, help="new tokens, EPIC (default = --tokens; quick 8)")
    ap.add_argument("--no-epic", action="store_true", help="skip the EPIC measurements")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="new tokens of the untimed warm-up run (default: the timed length; quick: 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed plain-sampling runs per worker after the warm-up (median reported)")
    ap.add_argument("--epic-repeats", type=int, default=1,
                    help="timed EPIC runs (each paired with a plain run) in an EPIC worker (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine (default: all cores)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--distinct-prompts", action="store_true",
                    help="batch rows get different prompts of the same length instead of copies of one")
    ap.add_argument("--worker-timeout", type=int, default=3600, help="seconds before a worker is killed")
    # worker side (internal)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("plain", "epic"), default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.tokens is None:
            args.tokens = 16
        return args
    if args.only is None:
        import importlib.util

        args.only = ",".join(e for e in ENGINES if e != "llama.cpp" or importlib.util.find_spec("llama_cpp"))
    args.only = [e.strip() for e in args.only.split(",") if e.strip()]
    bad = [e for e in args.only if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    if args.batches is None:
        args.batches = [1, 8]
    if args.prompt_lengths is None:
        args.prompt_lengths = [32] if args.quick else [32, 512]
    if args.tokens is None:
        args.tokens = 16 if args.quick else 128
    if args.epic_tokens is None:
        args.epic_tokens = 8 if args.quick else args.tokens
    if args.warmup_tokens is None and args.quick:
        args.warmup_tokens = 4
    if args.warmup_tokens is not None and args.warmup_tokens < 1:
        ap.error("--warmup-tokens must be >= 1")
    if min(args.batches) < 1 or min(args.prompt_lengths) < 2 or args.tokens < 1 or args.epic_tokens < 1 or min(args.repeats, args.epic_repeats) < 1:
        ap.error("batches, tokens and repeats must be >= 1 and prompt lengths >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
