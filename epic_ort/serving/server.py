"""Running the app under uvicorn, with a graceful shutdown: SIGTERM (or Ctrl-C) stops intake at once
(the listening socket closes, /health and new requests answer 503 "shutting down") and lets the
running requests finish, up to `shutdown_timeout` seconds; then the engine stops."""

from __future__ import annotations

from typing import Any

from .app import create_app
from .state import ServeSettings


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_timeout), access_log=False)
    _DrainingServer(config, app.state.epic).run()


class _DrainingServer:
    """uvicorn.Server whose exit signal first drains the engine (built lazily: uvicorn is optional)."""

    def __new__(cls, config: Any, state: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                state.drain()
                super().handle_exit(sig, frame)

        return Server(config)
