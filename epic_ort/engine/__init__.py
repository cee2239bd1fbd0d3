"""Continuous batching for serving: requests join the running batch at each step boundary and leave
as soon as they finish. No web code here; `epic_ort.serving` puts an OpenAI API on top.

    from epic_ort.engine import Engine, EngineRequest
    engine = Engine(model, max_running=16).start()
    samples = engine.generate(EngineRequest(model.encode("Hello"), GenerationConfig(seed=0), n=2))
"""

from .engine import Engine, EngineStats
from .errors import EngineClosedError, QueueFullError
from .observer import EngineObserver
from .request import (
           DoneEvent,
           EngineRequest,
           ErrorEvent,
           Event,
           SampleEvent,
           TokenEvent,
)

__all__ = ["DoneEvent", "Engine", "EngineClosedError", "EngineObserver", "EngineRequest", "EngineStats", "ErrorEvent",
           "Event", "QueueFullError", "SampleEvent", "TokenEvent"]
