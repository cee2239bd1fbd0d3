"""The server under load, over real HTTP with the tiny Llama: 32 concurrent mixed requests, a full
queue, a client that disconnects, 500 sequential requests (RSS), a graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from epic_ort.serving.launch import ServerProcess

EOS = "2"
NO_EOS = {EOS: -100}  # the tiny model's EOS id: requests run to their budget
# slow enough on the tiny model to be still running while a test acts on it
LONG = {"prompt": "a", "max_tokens": 40, "logit_bias": NO_EOS, "alpha": 0.5, "horizon": 8, "rollouts": 6,
        "seed": 1, "stream": True}


@pytest.fixture(scope="module")
def server(tiny_exports):
    with ServerProcess(tiny_exports["llama"]["onnx"], "--max-running", "16", "--max-queue", "64") as s:
        yield s


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(check, timeout=60.0):
    """Poll until check() is true (the test fails on the assertion after, not on time)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def mixed_request(i: int) -> dict:
    body = {"prompt": f"request {i} " + "ab" * (i % 7), "max_tokens": 4 + (i * 5) % 30, "seed": i}
    if i % 3 == 1:
        body.update(alpha=0.4 if i % 2 else -0.3, horizon=2 + i % 2, rollouts=2)
    if i % 4 == 2:
        body.update(top_p=0.9, temperature=0.8)
    if i % 5 == 3:
        body.update(n=2, stop=["e"])
    return body


def test_32_concurrent_mixed_requests_all_complete_and_equal_alone(server):
    bodies = [mixed_request(i) for i in range(32)]

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    together = asyncio.run(run_all())
    assert [r.status_code for r in together] == [200] * 32
    with httpx.Client(base_url=server.url, timeout=120) as c:
        alone = [c.post("/v1/completions", json=b) for b in bodies]
    texts = lambda r: [ch["text"] for ch in r.json()["choices"]]
    assert [texts(r) for r in together] == [texts(r) for r in alone]
    assert sum(len(r.json()["choices"]) for r in together) == 32 + sum(1 for i in range(32) if i % 5 == 3)
    assert metric(server, "epic_ort_running_rows") == 0


def test_a_client_disconnect_frees_its_row(server):
    cancelled = metric(server, 'epic_ort_requests_total{status="cancelled"}')
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=LONG) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # two chunks and their blank lines
            assert got[0].startswith("data: {")
            assert metric(server, "epic_ort_running_rows") == 1
        # leaving the block closes the connection mid-stream
    assert wait_for(lambda: metric(server, "epic_ort_running_rows") == 0)
    assert metric(server, 'epic_ort_requests_total{status="cancelled"}') == cancelled + 1


def test_500_sequential_requests_keep_rss_flat(server):
    proc = psutil.Process(server.pid)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        def run(count, start):
            for i in range(start, start + count):
                body = {"prompt": f"hello {i % 13}", "max_tokens": 3 + i % 5, "seed": i}
                if i % 4 == 0:
                    body.update(alpha=0.3, horizon=2)
                assert c.post("/v1/completions", json=body).status_code == 200
        run(100, 0)
        before = proc.memory_info().rss
        run(400, 100)
        after = proc.memory_info().rss
    assert after <= before * 1.10, (before, after)


def test_full_queue_is_429_at_once(tiny_exports):
    with ServerProcess(tiny_exports["llama"]["onnx"], "--max-running", "1", "--max-queue", "1") as s:
        results = {}

        def queued():
            results["queued"] = httpx.post(s.url + "/v1/completions", json={"prompt": "b", "max_tokens": 3}, timeout=120)

        with httpx.Client(base_url=s.url, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json=LONG) as running:
                lines = running.iter_lines()  # (kept: dropping it would close the connection)
                assert next(lines).startswith("data: {")  # it runs: the one row is taken
                waiter = threading.Thread(target=queued)
                waiter.start()
                assert wait_for(lambda: metric(s, "epic_ort_queue_depth") == 1)
                refused = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 3})
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "queue_full"
                rest = [x for x in lines if x]
            assert rest[-1] == "data: [DONE]"
            waiter.join()
        assert results["queued"].status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200


def test_sigterm_stops_intake_and_finishes_running_requests(tiny_exports):
    s = ServerProcess(tiny_exports["llama"]["onnx"]).start()
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json=LONG) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                s.proc.terminate()  # SIGTERM mid-stream
                assert wait_for(lambda: not _accepts(s))  # intake stops while the stream goes on
                rest = [x for x in lines if x]
        chunks = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to its end
        assert s.proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "Traceback" not in s.output()
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


def _accepts(server) -> bool:
    """A new connection gets an answer other than 503."""
    try:
        return httpx.get(server.url + "/health", timeout=2).status_code != 503
    except httpx.TransportError:
        return False
