#!/usr/bin/env python
"""Load benchmark of `epic-ort serve`: concurrent streaming clients against offline `generate`.

    python bench/serve.py [--model-dir models/smollm2-135m] [--concurrency 1,4,16,64]
        [--epic-concurrency 1,4,16] [--requests-per-client 2] [--max-tokens 32] [--prompt-tokens 32]
        [--alpha 0.2] [--driver openai|httpx] [--time-limit 300] [--json OUT.json]

For each mode (plain; EPIC at --alpha, horizon 4, rollouts 2) and each concurrency c, the server
(a child process on the loopback, started once) gets c clients, each sending --requests-per-client
streaming completions one after the other; every request has its own prompt of --prompt-tokens
tokens of the bundled prose (sent as token ids) and the same seed. Measured on the client side:
aggregate tokens/s (wall time from the first request to the last token), time to first token and
inter-token latency (gaps between a request's chunks), p50/p95. The anchor is the same requests,
the same tokens, through offline `generate` at batch size c in this process (with the server
idle), measured in the same run: the report prints server / offline ratios. Each request's text is
compared with its offline twin (they are equal up to float rounding).

The clients run in this process (the openai client by default, or raw SSE over httpx) and share the
CPU with the server, as a client on the same machine would. Bounded: a cell stops sending new
requests after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from epic_ort import generate, load
from epic_ort.serving.launch import ServerProcess
from epic_ort.settings import GenerationConfig

DATA = REPO / "epic_ort" / "data" / "pride_and_prejudice_excerpt.txt"
SEED = 1234


@dataclass
class Cell:
    """One (mode, concurrency) measurement."""

    mode: str
    concurrency: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    offline_tokens: int = 0
    offline_seconds: float = 0.0
    mismatches: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def offline_tps(self) -> float:
        return self.offline_tokens / self.offline_seconds if self.offline_seconds else 0.0


def prompts_of(model: Any, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids, consecutive windows of real prose."""
    ids = model.encode(" ".join(DATA.read_text(encoding="utf-8").split()), add_special_tokens=False)
    bos = [model.manifest.bos_token_id] if model.manifest.bos_token_id is not None else []
    body = length - len(bos)
    if (count * body) > len(ids):
        ids = ids * (count * body // len(ids) + 1)
    return [bos + ids[i * body:(i + 1) * body] for i in range(count)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# -- the clients ---------------------------------------------------------------------------------


async def one_request_openai(client: Any, model: str, prompt: list[int], extra: dict[str, Any], max_tokens: int,
                             cell: Cell, key: int) -> None:
    t0 = time.perf_counter()
    last, text, tokens = None, [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, seed=SEED,
                                             stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        cell.ttft.append(now - t0) if last is None else cell.itl.append(now - last)
        last = now
        text.append(chunk.choices[0].text)
    cell.tokens += tokens
    cell.requests += 1
    cell.texts[key] = "".join(text)


async def one_request_httpx(client: Any, model: str, prompt: list[int], extra: dict[str, Any], max_tokens: int,
                            cell: Cell, key: int) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": SEED, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    last, text, tokens = None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            cell.ttft.append(now - t0) if last is None else cell.itl.append(now - last)
            last = now
            text.append(chunk["choices"][0]["text"])
    cell.tokens += tokens
    cell.requests += 1
    cell.texts[key] = "".join(text)


async def drive(url: str, model: str, cell: Cell, prompts: list[list[int]], extra: dict[str, Any], args: Any) -> None:
    """c clients, each sending its requests one after the other."""
    if args.driver == "openai":
        import openai

        client: Any = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        send = one_request_openai
    else:
        import httpx

        client = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=256))
        send = one_request_httpx
    deadline = time.perf_counter() + args.time_limit

    async def worker(w: int) -> None:
        for r in range(args.requests_per_client):
            if time.perf_counter() > deadline:
                return
            key = w * args.requests_per_client + r
            await send(client, model, prompts[key], extra, args.max_tokens, cell, key)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(cell.concurrency)))
    cell.seconds = time.perf_counter() - t0
    await client.close() if args.driver == "openai" else await client.aclose()


# -- the offline anchor ------------------------------------------------------------------------


def offline(model: Any, cell: Cell, prompts: list[list[int]], config: GenerationConfig, check: int) -> None:
    """The same requests through `generate` at batch size c, timed. Each row draws what its server
    request drew (prompt_index 0, sample 0, the same seed) where `generate` takes prompt_indices.
    Then the first `check` requests are run alone and their texts compared with the server's."""
    keys = sorted(cell.texts)  # the requests the server ran (all, unless the time limit cut them)
    ids = [prompts[k] for k in keys]
    kw: dict[str, Any] = {}
    if "prompt_indices" in inspect.signature(generate).parameters:
        kw["prompt_indices"] = [0] * len(ids)
    t0 = time.perf_counter()
    samples = list(generate(model, prompt_ids=ids, config=config, batch_size=cell.concurrency, **kw))
    cell.offline_seconds = time.perf_counter() - t0
    cell.offline_tokens = sum(len(s.token_ids) for s in samples)
    for k in keys[:check]:
        alone = next(generate(model, prompt_ids=[prompts[k]], config=config))
        cell.mismatches += alone.text != cell.texts[k]


# -- the run -----------------------------------------------------------------------------------


def modes(args: Any) -> dict[str, tuple[dict[str, Any], GenerationConfig, list[int]]]:
    base = GenerationConfig(max_new_tokens=args.max_tokens, seed=SEED)
    epic = {"alpha": args.alpha, "horizon": 4, "rollouts": 2}
    return {"plain": ({}, base, args.concurrency),
            "epic": (epic, GenerationConfig(max_new_tokens=args.max_tokens, seed=SEED, **epic), args.epic_concurrency)}


def run(args: Any) -> list[Cell]:
    model = load(args.model_dir, provider="cpu", threads=args.threads)
    most = max(args.concurrency + args.epic_concurrency) * args.requests_per_client
    prompts = prompts_of(model, most, args.prompt_tokens)
    cells = []
    server_args = ["--max-running", str(max(args.concurrency + args.epic_concurrency)), "--max-queue", "256"]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    with ServerProcess(args.model_dir, *server_args) as server:
        name = Path(args.model_dir).name
        warm = Cell("warm-up", 1)
        asyncio.run(drive(server.url, name, warm, prompts, {}, argparse.Namespace(**{**vars(args),
                                                                                     "requests_per_client": 1})))
        for mode, (extra, config, levels) in modes(args).items():
            for c in levels:
                cell = Cell(mode, c)
                asyncio.run(drive(server.url, name, cell, prompts, extra, args))
                # right after, with the server idle: the anchor sees the same machine load
                offline(model, cell, prompts, config, args.check)
                cells.append(cell)
                print(f"  {mode} x{c}: {cell.requests} requests, {cell.tps:.1f} tok/s served, "
                      f"{cell.offline_tps:.1f} offline", file=sys.stderr)
    return cells


def report(cells: list[Cell], args: Any) -> str:
    head = (f"model {args.model_dir}, prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens, "
            f"{args.requests_per_client} requests per client, driver {args.driver}, EPIC alpha {args.alpha} k=4 R=2")
    rows = ["| mode | clients | requests | server tok/s | offline tok/s (batch c) | ratio | TTFT p50 / p95 ms "
            "| ITL p50 / p95 ms | texts equal |", "|" + "---|" * 9]
    for c in cells:
        ratio = c.tps / c.offline_tps if c.offline_tps else float("nan")
        checked = min(args.check, c.requests)
        rows.append(f"| {c.mode} | {c.concurrency} | {c.requests} | {c.tps:.1f} | {c.offline_tps:.1f} | {ratio:.2f} | "
                    f"{1e3 * pct(c.ttft, .5):.0f} / {1e3 * pct(c.ttft, .95):.0f} | "
                    f"{1e3 * pct(c.itl, .5):.1f} / {1e3 * pct(c.itl, .95):.1f} | {checked - c.mismatches}/{checked} |")
    return head + "\n\n" + "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> Any:
    levels = lambda s: [int(x) for x in s.split(",") if x]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=str(REPO / "models" / "smollm2-135m"))
    p.add_argument("--concurrency", type=levels, default=[1, 4, 16, 64])
    p.add_argument("--epic-concurrency", type=levels, default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--driver", choices=["openai", "httpx"], default="openai")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (server and offline alike)")
    p.add_argument("--check", type=int, default=2, help="requests per cell whose text is compared with a run alone")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds a cell keeps sending new requests")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cells = run(args)
    print(report(cells, args))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in vars(c).items() if k not in ("texts", "ttft", "itl")}
                                         | {"tps": c.tps, "offline_tps": c.offline_tps,
                                            "ttft_p50": pct(c.ttft, .5), "ttft_p95": pct(c.ttft, .95),
                                            "itl_p50": pct(c.itl, .5), "itl_p95": pct(c.itl, .95)}
                                         for c in cells], indent=2))


if __name__ == "__main__":
    main()
