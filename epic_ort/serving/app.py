"""The OpenAI-compatible FastAPI app of one engine: `create_app(ServeSettings(model_dir=...))`.

    POST /v1/completions, POST /v1/chat/completions   (JSON, or SSE with "stream": true)
    GET  /v1/models, /health, /metrics

The model loads in the background once the app starts (lifespan), so the server answers at once:
503 until the engine runs. Every error, ours or an unexpected one, is OpenAI's JSON error object
(never a traceback); every response carries the replica's id in `x-epic-ort-replica`.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from .errors import APIError
from .routes import chat_completions, completions, health, metrics, models
from .state import ServerState, ServeSettings

REPLICA_HEADER = "x-epic-ort-replica"


def create_app(settings: ServeSettings) -> Any:
    from fastapi import FastAPI

    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().run_in_executor(None, state.load)
        try:
            yield
        finally:
            state.drain()
            await loading
            await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="epic-ort", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.epic = state
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    _install_error_handlers(app, state)
    app.add_middleware(ReplicaHeader, replica=state.replica_id)
    return app


def _install_error_handlers(app: Any, state: ServerState) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def api_error(request: Any, exc: APIError) -> Any:
        state.metrics.rejected(exc.status)
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request: Any, exc: HTTPException) -> Any:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    async def invalid(request: Any, exc: Exception) -> Any:
        return await api_error(request, APIError(400, "the request could not be read", code="invalid_request"))

    async def unexpected(request: Any, exc: Exception) -> Any:
        return await api_error(request, APIError(500, "internal server error; see the server log",
                                                 type="server_error", code="internal_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)


class ReplicaHeader:
    """ASGI middleware adding the replica id to every response (which replica served it)."""

    def __init__(self, app: Any, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
