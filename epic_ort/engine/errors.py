"""The engine's own refusals. Both are EpicOrtErrors: a client can act on them (retry later, go to
another replica); the HTTP layer turns them into 429 and 503."""

from __future__ import annotations

from ..errors import EpicOrtError


class QueueFullError(EpicOrtError):
    """Every running row is taken and the queue holds its maximum: the request is refused at once
    instead of waiting without bound."""


class EngineClosedError(EpicOrtError):
    """The engine is not taking requests: not started yet, draining for shutdown, or closed."""
