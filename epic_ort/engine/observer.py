"""What the engine reports as it runs, for whoever keeps metrics (the server's Prometheus endpoint).

The engine calls these from its own thread, so an observer must be quick and thread-safe (Prometheus
client metrics are). The base class does nothing: an engine without metrics pays nothing.
"""

from __future__ import annotations


class EngineObserver:
    """Hooks called from the engine thread."""

    def request_done(self, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        """A request ended: status completed, cancelled or failed."""

    def first_token(self, seconds: float) -> None:
        """Time from a request's submission to its first token (queueing and prefill included)."""

    def token_gap(self, seconds: float) -> None:
        """Time between two consecutive tokens of one sample (inter-token latency)."""
