"""Errors over HTTP in OpenAI's format: {"error": {"message", "type", "param", "code"}} with the
status a client can act on. The engine raises typed errors; this is the one place that maps them."""

from __future__ import annotations

from typing import Any

from ..engine.errors import EngineClosedError, QueueFullError
from ..errors import CalibrationError, EpicOrtError, InvalidRequestError


class APIError(Exception):
    """An error response: HTTP status, message, OpenAI error type, the offending field, a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine(error: Exception, param: str | None = None) -> APIError:
    """The response for an error the engine (or the settings table) raised."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFullError):
        return APIError(429, str(error), type="rate_limit_error", code="queue_full")
    if isinstance(error, EngineClosedError):
        return APIError(503, str(error), type="server_error", code="shutting_down")
    if isinstance(error, (InvalidRequestError, CalibrationError)):
        return bad_request(str(error), param=param)
    if isinstance(error, EpicOrtError):
        return APIError(500, str(error), type="server_error", code=type(error).__name__)
    return APIError(500, "internal error while generating; see the server log", type="server_error",
                    code="internal_error")
