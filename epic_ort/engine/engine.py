"""`Engine`: continuous batching over one model, with an async and a sync face.

    engine = Engine(model, max_running=16, max_queue=64).start()
    async for event in engine.stream(EngineRequest(prompt_ids, config, n=2)):
        ...                                   # TokenEvent, SampleEvent, ..., DoneEvent
    samples = engine.generate(request)        # the same, blocking: the finished samples

Requests are checked and queued at once, in the caller's thread (a bad one raises
InvalidRequestError, a full server QueueFullError, a closing one EngineClosedError); the model runs
in the engine's own thread (`scheduler.py`). Leaving a stream early (break, an exception, a task
cancelled because its client went away) cancels its request: its rows leave at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from dataclasses import dataclass

from ..decoding import Sample
from ..runtime.model import CausalLM
from .errors import EngineClosedError
from .observer import EngineObserver
from .request import DoneEvent, EngineRequest, ErrorEvent, Event, SampleEvent, prepare
from .scheduler import Job, Scheduler, Sink


@dataclass(frozen=True)
class EngineStats:
    queued: int
    running_rows: int
    running_requests: int
    accepting: bool


class Engine:
    """Continuous batching: requests join the running batch at the next step boundary.

    max_running: rows (samples) decoded at once; max_queue: requests waiting beyond those;
    prefill_tokens: most prompt tokens (padded) prefilled per step boundary."""

    def __init__(self, model: CausalLM, *, max_running: int = 16, max_queue: int = 64, prefill_tokens: int = 2048,
                 observer: EngineObserver | None = None):
        if max_running < 1 or max_queue < 0 or prefill_tokens < 1:
            raise ValueError("max_running and prefill_tokens must be >= 1, max_queue >= 0")
        self.model = model
        self.max_running = max_running
        self.scheduler = Scheduler(model, max_running, max_queue, prefill_tokens, observer or EngineObserver())
        self._thread: threading.Thread | None = None

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self.scheduler.run, name="epic-ort-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: EngineRequest, sink: Sink) -> Job:
        """Check and queue `request`; `sink` receives its events (lists, from the engine thread)."""
        job = Job(prepare(self.model, request, self.max_running), sink, self.scheduler.cancel)
        self.scheduler.submit(job)
        return job

    def stream(self, request: EngineRequest) -> "EventStream":
        """The request's events as an async iterator; call it inside a running event loop. The
        request is queued now, so refusals raise here, before anything is iterated."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list[Event]] = asyncio.Queue()
        job = self.submit(request, lambda events: loop.call_soon_threadsafe(inbox.put_nowait, events))
        return EventStream(job, inbox)

    def stream_sync(self, request: EngineRequest) -> "SyncEventStream":
        """The same events for synchronous callers (blocking iteration)."""
        inbox: queue.SimpleQueue[list[Event]] = queue.SimpleQueue()
        job = self.submit(request, inbox.put)
        return SyncEventStream(job, inbox)  # type: ignore[arg-type]

    def generate(self, request: EngineRequest) -> list[Sample]:
        """Run the request to its end; its samples in sample order."""
        samples = [e.sample for e in self.stream_sync(request) if isinstance(e, SampleEvent)]
        return sorted(samples, key=lambda s: s.sample_index)

    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(s["queued"], s["running_rows"], s["running_requests"], self.scheduler.accepting)

    def drain(self) -> None:
        """Stop taking requests (EngineClosedError); those queued and running go on to their end."""
        with self.scheduler.cond:
            self.scheduler.accepting = False

    def close(self, timeout: float | None = None) -> None:
        """Drain, wait up to `timeout` seconds for the requests in hand to finish, then stop (what is
        still running then fails with EngineClosedError)."""
        sched = self.scheduler
        with sched.cond:
            sched.accepting = False
            sched.stop_when_idle = True
            sched.cond.notify_all()
        if self._thread is None:
            sched._fail_all(EngineClosedError("the engine was closed before it started"))
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with sched.cond:
                sched.abort = True
                sched.cond.notify_all()
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventStream:
    """A request's events for `async for`; `cancel()`, or dropping it before its end, cancels it."""

    def __init__(self, job: Job, inbox: "asyncio.Queue[list[Event]]"):
        self.job, self._inbox, self._ready, self.over = job, inbox, deque(), False  # type: ignore[var-annotated]

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> Event:
        while not self._ready:
            if self.over:
                raise StopAsyncIteration
            self._ready.extend(await self._inbox.get())
        return self._take()

    def _take(self) -> Event:
        event = self._ready.popleft()
        if isinstance(event, ErrorEvent):
            self.over = True
            raise event.error
        if isinstance(event, DoneEvent):
            self.over = True
        return event

    def cancel(self) -> None:
        if not self.over:
            self.over = True
            self.job.cancel()

    def __del__(self) -> None:
        self.cancel()


class SyncEventStream(EventStream):
    """The same for plain iteration (blocking)."""

    def __iter__(self) -> "SyncEventStream":
        return self

    def __next__(self) -> Event:
        while not self._ready:
            if self.over:
                raise StopIteration
            self._ready.extend(self._inbox.get())  # type: ignore[arg-type]
        return self._take()
