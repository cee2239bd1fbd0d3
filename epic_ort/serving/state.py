"""One server's settings and state: the model and engine (loaded in the background, so the server
answers 503 while loading), the API key, the alpha policy, draining for shutdown."""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from ..engine.engine import Engine, EngineStats
from ..errors import CalibrationError
from ..runtime.model import CausalLM, load
from ..settings import AUTO, Alpha, GenerationConfig
from .errors import APIError
from .metrics import Metrics


@dataclass
class ServeSettings:
    """Everything `epic-ort serve` (or a Ray replica) is started with."""

    model_dir: str
    provider: str = "auto"
    threads: int | None = None
    max_running: int = 16
    max_queue: int = 64
    prefill_tokens: int = 2048
    api_key: str | None = None
    alpha: Alpha = 0.0  # the default of requests that do not set alpha; "auto": calibrated, at startup
    served_model_name: str | None = None
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 60.0
    replica_id: str | None = None


class ServerState:
    """What the routes share. `load` runs once, in a worker thread."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.model: CausalLM | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.draining = False
        self._alpha: dict[tuple[int, int], float] = {}
        self.metrics = Metrics(self.stats)
        self.replica_id = settings.replica_id or secrets.token_hex(4)

    # -- what the request parser needs (schema.Context) ---------------------------------------

    @property
    def served_model(self) -> str:
        return self.settings.served_model_name or Path(self.settings.model_dir).name

    @property
    def max_n(self) -> int:
        return self.settings.max_running

    @property
    def default_alpha(self) -> Alpha:
        return self.settings.alpha

    def alpha_for(self, horizon: int, rollouts: int) -> float:
        """alpha "auto" at (horizon, rollouts): resolved at startup for the defaults; other settings
        need a calibration made for them (a request never waits minutes for one)."""
        key = (horizon, rollouts)
        if key not in self._alpha:
            from ..calibration.store import check_calibration, read_calibration

            data = read_calibration(self.model.model_dir)  # type: ignore[union-attr]
            if data is None:
                raise CalibrationError(f"{self.settings.model_dir} has no calibration; start the server with "
                                       "--alpha auto or run `epic-ort calibrate` first")
            check_calibration(data, self.model, horizon, rollouts)  # type: ignore[arg-type]
            self._alpha[key] = float(data["alpha"])
        return self._alpha[key]

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, resolve a default alpha "auto" (calibrating if need be), start the engine."""
        s = self.settings
        try:
            model = load(s.model_dir, provider=s.provider, threads=s.threads)
            self.model = model
            if s.alpha == AUTO:
                from ..calibration.store import resolve_auto_alpha

                d = GenerationConfig()
                self._alpha[(d.horizon, d.rollouts)] = resolve_auto_alpha(model, d.horizon, d.rollouts,
                                                                          show_progress=False)
            self.engine = Engine(model, max_running=s.max_running, max_queue=s.max_queue,
                                 prefill_tokens=s.prefill_tokens, observer=self.metrics).start()
        except Exception as e:
            self.load_error = str(e) or type(e).__name__
            print(f"epic-ort serve: cannot start: {self.load_error}", file=sys.stderr)

    def require_engine(self) -> Engine:
        """The engine, or the 503 a client should retry after."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.load_error is not None:
            raise APIError(503, f"the model could not be loaded: {self.load_error}", type="server_error",
                           code="model_load_failed")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="model_loading")
        return self.engine

    def check_key(self, authorization: str | None) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = (authorization or "")[7:] if (authorization or "").startswith("Bearer ") else ""
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY').",
                           code="invalid_api_key")

    def stats(self) -> EngineStats:
        if self.engine is None:
            return EngineStats(0, 0, 0, False)
        return self.engine.stats()

    def drain(self) -> None:
        self.draining = True
        if self.engine is not None:
            self.engine.drain()

    def close(self) -> None:
        self.drain()
        if self.engine is not None:
            self.engine.close(timeout=self.settings.shutdown_timeout)
