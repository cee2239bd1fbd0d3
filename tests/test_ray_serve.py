"""The Ray Serve deployment on a local Ray instance: two replicas of the OpenAI app, both serving
(each answer names its replica). Skipped where ray[serve] is not installed."""

from __future__ import annotations

import os
import time

import pytest

# a 2-core machine under load answers health checks slowly: Ray's defaults (5-10 s) would kill a proxy that
# is only busy; set before Ray is imported (its constants read the environment once)
for _name in ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"):
    os.environ.setdefault(_name, "120")

serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import ray

from epic_ort import generate
from epic_ort.serving.launch import free_port
from epic_ort.settings import GenerationConfig


@pytest.fixture(scope="module")
def ray_app(tiny_exports):
    from epic_ort.serving.ray import app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"model_dir": str(tiny_exports["llama"]["onnx"]), "num_replicas": "2", "num_cpus": "0.5",
                       "threads": "1", "max_running": "8"}), name="epic-ort", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and httpx.get(url + "/health", timeout=10).status_code != 200:
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_both_serve(ray_app, tiny_llama):
    seen, texts = set(), set()
    with httpx.Client(base_url=ray_app, timeout=60) as c:
        for _ in range(40):
            r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "seed": 4})
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-epic-ort-replica"])
            texts.add(r.json()["choices"][0]["text"])
            if len(seen) == 2:
                break
        health = {c.get("/health").json()["replica"] for _ in range(20)}
    assert len(seen) == 2, seen
    assert health and health <= seen  # /health names the replica that answered it
    # whichever replica answered, the same seed gives the offline text
    want = next(generate(tiny_llama, ["hello"], GenerationConfig(max_new_tokens=8, seed=4))).text
    assert texts == {want}
