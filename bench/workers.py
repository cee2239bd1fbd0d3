"""The benchmark's workers: one engine, one configuration, one process (`python bench/run.py --worker ENGINE`),
reporting one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from prompts import build_prompts

DEFAULT_ALIAS = "smollm2-135m"  # the GGUF the default export is made from (epic_ort.export.sources.ALIASES)
RESULT_MARK = "BENCH_RESULT "
EPIC = {"alpha": 0.2, "horizon": 4, "rollouts": 2}


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


@contextlib.contextmanager
def gguf_file(alias: str) -> Iterator[str]:
    """The GGUF file of an export alias, as it is: the package's own file, or one assembled into a
    temporary folder for packages that ship it in chunks (removed afterwards)."""
    from epic_ort.export.sources import ALIASES, resolve_source

    folder, kwargs, _ = resolve_source(alias)  # one clear error when the package is missing
    if not ALIASES[alias].assembled:
        yield str(Path(folder) / kwargs["gguf_file"])
        return
    import importlib

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        path = Path(tmp) / kwargs["gguf_file"]
        importlib.import_module(ALIASES[alias].package).assemble(path)
        yield str(path)


def _model_tokens(model_dir: str) -> tuple[set[int], int]:
    """(end-of-sequence ids, the pad id for generate) from the export's manifest."""
    manifest = json.loads((Path(model_dir) / "epic_ort_manifest.json").read_text())
    eos = {int(t) for t in manifest["eos_token_ids"]}
    pad = manifest.get("pad_token_id")
    return eos, int(pad if pad is not None else min(eos))


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


class _Recorder:
    """Wraps a chooser to keep each step's per-row stats (generate only keeps totals)."""

    def __init__(self, inner):
        self.inner, self.steps, self.row_steps = inner, 0, []
        self.scratch_positions = inner.scratch_positions  # room EPIC's trees need in the cache

    def choose(self, model, rows, logits, scores, cache):
        res = self.inner.choose(model, rows, logits, scores, cache)
        self.steps += 1
        if res.row_stats is not None:
            self.row_steps.extend(res.row_stats)
        return res


def _epic_ort_run(model, ids: list[list[int]], args: argparse.Namespace, alpha: float,
                  tokens: int | None = None) -> dict[str, Any]:
    """One timed unit: every prompt generated once at this alpha (0: plain sampling)."""
    import epic_ort
    from epic_ort.decoding import GenerationConfig, make_chooser

    cfg = GenerationConfig(max_new_tokens=tokens or args.tokens, temperature=1.0, top_k=0, top_p=1.0,
                           seed=args.seed, alpha=alpha, horizon=EPIC["horizon"], rollouts=EPIC["rollouts"])
    rec = _Recorder(make_chooser(cfg))
    calls0, rows0 = model.calls.calls, model.calls.positions
    samples = list(epic_ort.generate(model, prompt_ids=ids, config=cfg, batch_size=args.batch, chooser=rec))
    return {"samples": samples, "rec": rec,
            "ort_calls": model.calls.calls - calls0, "ort_positions": model.calls.positions - rows0}


def _search_stats(samples, rec: _Recorder, generated: int) -> dict[str, Any]:
    """EPIC's per-token and per-step costs: entropy evaluations, pruned rollouts, calls, tree tokens."""
    out: dict[str, Any] = {}
    for key, name in (("entropy_evals", "evals"), ("rollouts_skipped", "rollouts_skipped"),
                      ("forward_passes", "forward_passes"), ("lookahead_tokens", "lookahead_tokens")):
        vals = [float(r.get(key, 0)) for r in rec.row_steps]
        out[f"{name}_per_token"] = sum(float(s.stats.get(key, 0)) for s in samples) / generated
        out[f"{name}_per_step_mean"] = statistics.fmean(vals)
        out[f"{name}_per_step_p95"] = _pct(vals, 95)
    return out


def _epic_ort_summary(times: list[float], last: dict[str, Any]) -> dict[str, Any]:
    samples, rec = last["samples"], last["rec"]
    generated = sum(int(s.stats["tokens"]) for s in samples)
    wall = statistics.median(times)
    ordered = sorted(samples, key=lambda s: (s.prompt_index, s.sample_index))
    out = {
        "tokens_sha1": _sha([s.token_ids for s in ordered]),
        "seconds": wall, "seconds_all": times, "generated_tokens": generated,
        "tokens_per_s": generated / wall, "seconds_per_token": wall / generated,
        "finish_reasons": {r: sum(s.finish_reason == r for s in samples) for r in {s.finish_reason for s in samples}},
        "steps": rec.steps, "ort_calls": last["ort_calls"], "ort_positions": last["ort_positions"],
        "ort_calls_per_step": last["ort_calls"] / max(rec.steps, 1),
        "ort_positions_per_token": last["ort_positions"] / generated,
    }
    if rec.row_steps:
        out.update(_search_stats(samples, rec, generated))
    else:  # plain sampling: each row takes part in one ORT call per token (prefill included)
        out["forward_passes_per_token"] = last["ort_calls"] / max(max(int(s.stats["tokens"]) for s in samples), 1)
    return out


def worker_epic_ort(args: argparse.Namespace) -> dict[str, Any]:
    import epic_ort

    prompts = _worker_prompts(args)
    t0 = time.perf_counter()
    model = epic_ort.load(args.model_dir, provider="cpu", threads=args.threads)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now_mb()
    ids = [model.encode(p["text"]) for p in prompts]
    result: dict[str, Any] = {
        "load_seconds": load_s, "rss_after_load_mb": rss_loaded,
        "prompt_tokens": [len(i) for i in ids], "prompt_ids_match": _check_ids(ids, prompts),
        "session_threads": {"intra_op": args.threads, "inter_op": 1},
    }
    run = lambda alpha, tokens=None: _epic_ort_run(model, ids, args, alpha, tokens)  # noqa: E731
    if args.mode == "plain":
        run(0.0, args.warmup_tokens)  # warm-up
        result.update(_epic_ort_summary(*_timed(lambda: run(0.0), args.repeats)))
        return result
    run(EPIC["alpha"], args.warmup_tokens)  # warm-ups, both modes, untimed
    run(0.0, args.warmup_tokens)
    epic_times, plain_times, epic_last, plain_last = [], [], None, None
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        t, epic_last = _timed(lambda: run(EPIC["alpha"]), 1)
        epic_times += t
        t, plain_last = _timed(lambda: run(0.0), 1)
        plain_times += t
    result.update(_epic_ort_summary(epic_times, epic_last))
    plain = _epic_ort_summary(plain_times, plain_last)
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


def _hf_generate_kwargs(tokens: int, pad: int) -> dict[str, Any]:
    return dict(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad,
    )


def _run_hf_like(args: argparse.Namespace, model, prompts, extra: dict[str, Any]) -> dict[str, Any]:
    """generate() on the prompts' own token ids (every engine gets the same ids; transformers' GGUF
    tokenizer of Gemma, for one, splits words otherwise)."""
    import torch

    ids = [list(p["ids"]) for p in prompts]
    enc = {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long)}
    prompt_len = len(ids[0])
    eos, pad = _model_tokens(args.model_dir)

    def run(tokens: int | None = None):
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            return model.generate(**enc, **_hf_generate_kwargs(tokens or args.tokens, pad))

    run(args.warmup_tokens)  # warm-up
    times, out = _timed(run, args.repeats)
    generated = _hf_count_generated(out, prompt_len, eos)
    wall = statistics.median(times)
    res = {
        "prompt_tokens": [len(i) for i in ids], "prompt_ids_match": True,
        "tokens_sha1": _sha(out[:, prompt_len:].tolist()),
        "seconds": wall, "seconds_all": times, "generated_tokens": generated,
        "tokens_per_s": generated / wall, "seconds_per_token": wall / generated,
        "forward_passes_per_token": 1.0,
    }
    res.update(extra)
    return res


def worker_transformers(args: argparse.Namespace) -> dict[str, Any]:

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from transformers import AutoModelForCausalLM

    from epic_ort.export.sources import opened_source

    prompts = _worker_prompts(args)
    t0 = time.perf_counter()
    with opened_source(args.alias) as src:  # the GGUF the export was made from, loadable by transformers
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, **src.kwargs).eval()
    load_s = time.perf_counter() - t0
    extra = {
        "load_seconds": load_s, "rss_after_load_mb": _rss_now_mb(),
        "weights": f"{src.description} (dequantized to float32)",
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    return _run_hf_like(args, model, prompts, extra)


def worker_optimum(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    from optimum.onnxruntime import ORTModelForCausalLM

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
    load_s = time.perf_counter() - t0
    extra = {
        "load_seconds": load_s, "rss_after_load_mb": _rss_now_mb(),
        "use_io_binding": bool(getattr(model, "use_io_binding", False)),
        "can_use_cache": bool(getattr(model, "can_use_cache", False)),
        "session_threads": {"intra_op": args.threads, "inter_op": 1},
    }
    return _run_hf_like(args, model, prompts, extra)


def worker_llama_cpp(args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp on the very GGUF file the export was made from: what a CPU user runs instead of us.
    Batch 1 only (llama-cpp-python's generate runs one sequence); the prompt goes in as the same
    token ids the other engines get, and every timed run starts from an empty KV cache."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise RuntimeError("llama-cpp-python is not installed (it builds from source: see bench/README.md)") from None
    if args.batch != 1 or args.mode != "plain":
        raise RuntimeError("the llama.cpp anchor runs plain sampling at batch 1 only")
    prompts = _worker_prompts(args)
    ids = list(prompts[0]["ids"])
    t0 = time.perf_counter()
    with gguf_file(args.alias) as path:  # llama.cpp maps the file: it may go once loaded
        llm = Llama(model_path=path, n_ctx=len(ids) + max(args.tokens, args.warmup_tokens or 0) + 8,
                    n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, seed=args.seed, verbose=False)
    load_s = time.perf_counter() - t0

    def run(tokens: int | None = None) -> list[int]:
        llm.reset()
        out: list[int] = []
        for token in llm.generate(ids, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                  repeat_penalty=1.0, reset=True):
            out.append(int(token))  # like min_new_tokens: an end-of-sequence token does not stop the count
            if len(out) == (tokens or args.tokens):
                return out

    run(args.warmup_tokens)
    times, out = _timed(run, args.repeats)
    wall = statistics.median(times)
    from importlib import metadata

    return {
        "load_seconds": load_s, "rss_after_load_mb": _rss_now_mb(), "prompt_tokens": [len(ids)],
        "prompt_ids_match": True, "tokens_sha1": _sha([out]), "seconds": wall, "seconds_all": times,
        "generated_tokens": len(out), "tokens_per_s": len(out) / wall, "seconds_per_token": wall / len(out),
        "forward_passes_per_token": 1.0, "weights": args.alias, "llama_cpp_python": metadata.version("llama-cpp-python"),
    }


WORKERS = {"epic-ort": worker_epic_ort, "transformers": worker_transformers, "optimum": worker_optimum,
           "llama.cpp": worker_llama_cpp}


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
