"""Prometheus metrics of one server: requests by outcome, tokens, queue depth, running rows,
time to first token and inter-token latency. The engine reports through `EngineObserver` hooks
(called from its thread; prometheus_client metrics are thread-safe); gauges are read at scrape time.
Each server has its own registry, so several apps in one process (tests) do not collide."""

from __future__ import annotations

from typing import Callable

from ..engine.engine import EngineStats
from ..engine.observer import EngineObserver

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics(EngineObserver):
    def __init__(self, stats: Callable[[], EngineStats]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("epic_ort_requests", "Requests by outcome (completed, cancelled, failed, rejected_<status>).",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("epic_ort_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("epic_ort_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("epic_ort_time_to_first_token_seconds", "Submission to first token (queue and prefill "
                              "included).", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("epic_ort_inter_token_latency_seconds", "Time between consecutive tokens of a sample.",
                             buckets=ITL_BUCKETS, registry=r)
        Gauge("epic_ort_queue_depth", "Requests waiting for room.", registry=r).set_function(lambda: stats().queued)
        Gauge("epic_ort_running_rows", "Rows (samples) being decoded.", registry=r).set_function(
            lambda: stats().running_rows)
        Gauge("epic_ort_running_requests", "Requests being decoded.", registry=r).set_function(
            lambda: stats().running_requests)

    def request_done(self, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(status).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def rejected(self, status: int) -> None:
        self.requests.labels(f"rejected_{status}").inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
