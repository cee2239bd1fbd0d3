"""The engine thread's loop: admit queued requests at a step boundary, prefill them, step every group,
hand each request its events.

Everything that touches the model or the caches runs here, in one thread (ONNX Runtime releases the
GIL while it computes). Other threads only queue requests, flag cancellations and receive events
through each request's `sink`. A cycle:

1. rows of cancelled requests leave; queued requests join while running rows stay within
   `max_running` (first come, first served; no request jumps the queue) and their prompts within
   `prefill_tokens` (padded) per cycle, so one cycle's prefill does not stall the others for long;
2. the joiners are prefilled in one call and placed in their groups (`groups.py`);
3. each group steps once: every row gets one token; finished rows leave at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Hashable, Sequence

import numpy as np

from ..decoding import Sample
from ..runtime.model import CausalLM
from .errors import EngineClosedError, QueueFullError
from .groups import Group, Outcome, epic_chooser
from .observer import EngineObserver
from .request import (
    DoneEvent,
    EngineRequest,
    ErrorEvent,
    Event,
    SampleEvent,
    TokenEvent,
)
from .rows import EngineRow, group_key, make_rows, released_text

Sink = Callable[[list[Event]], None]


class Job:
    """One request inside the engine: its rows' progress and where its events go."""

    def __init__(self, request: EngineRequest, sink: Sink, cancel: Callable[["Job"], None]):
        self.request = request
        self.sink = sink
        self._cancel = cancel
        self.cancelled = False
        self.finished = False
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token_at: float | None = None
        self.open_rows = request.n
        self.completion_tokens = 0

    def cancel(self) -> None:
        """Ask the engine to drop this request at the next step boundary (idempotent)."""
        if not self.finished:
            self._cancel(self)


class Scheduler:
    """The queue, the running groups, and the loop that drives them (`run`, in the engine thread)."""

    def __init__(self, model: CausalLM, max_running: int, max_queue: int, prefill_tokens: int,
                 observer: EngineObserver):
        self.model = model
        self.max_running, self.max_queue, self.prefill_tokens = max_running, max_queue, prefill_tokens
        self.observer = observer
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.groups: dict[Hashable, Group] = {}
        self.running_rows = 0
        self.running_jobs = 0
        self.accepting = True
        self.stop_when_idle = False
        self.abort = False

    # -- any thread -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if not self.accepting:
                raise EngineClosedError("the server is shutting down; retry on another replica")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the server is full ({self.running_rows} rows running, {len(self.waiting)} "
                                     "requests queued); retry later")
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            job.cancelled = True
            self.cond.notify()

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"queued": len(self.waiting), "running_rows": self.running_rows,
                    "running_requests": self.running_jobs}

    # -- the engine thread ----------------------------------------------------------------

    def run(self) -> None:
        """Cycle until told to stop (`stop_when_idle`: once nothing is queued or running)."""
        while True:
            with self.cond:
                while not self._work() and not self.abort and not self.stop_when_idle:
                    self.cond.wait()
                if self.abort or (self.stop_when_idle and not self._work()):
                    break
                joining = self._admit()
            try:
                self._cycle(joining)
            except Exception as e:
                self._fail_all(e)
        self._fail_all(EngineClosedError("the engine was closed before this request finished"))

    def _work(self) -> bool:
        return bool(self.waiting) or self.running_rows > 0

    def _admit(self) -> list[Job]:
        """Queued requests that join now (called with the lock held)."""
        out: list[Job] = []
        widest = 0
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self._done(job, cancelled=True)
                continue
            n, length = job.request.n, len(job.request.prompt_ids)
            if self.running_rows + n > self.max_running:
                break
            if out and (len(out) + 1) * max(widest, length) > self.prefill_tokens:
                break
            self.waiting.popleft()
            job.started = time.perf_counter()
            widest = max(widest, length)
            self.running_rows += n
            self.running_jobs += 1
            out.append(job)
        return out

    def _cycle(self, joining: list[Job]) -> None:
        self._drop_cancelled()
        if joining:
            self._join(joining)
        for group in list(self.groups.values()):
            if group.rows:
                self._step(group)
        self._forget_empty_groups()

    def _drop_cancelled(self) -> None:
        for group in self.groups.values():
            leaving = [i for i, r in enumerate(group.rows) if r.job.cancelled]
            if leaving:
                jobs = {id(group.rows[i].job): group.rows[i].job for i in leaving}
                group.remove(leaving)
                self._release(len(leaving))
                for job in jobs.values():
                    self._done(job, cancelled=True)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill the joiners in one call and place their rows in their groups."""
        try:
            logits, cache = self.model.prefill([list(j.request.prompt_ids) for j in jobs])
        except Exception as e:
            for job in jobs:
                self._release(job.request.n)
                self._fail(job, e)
            return
        for i, job in enumerate(jobs):
            rows = make_rows(self.model, job.request, job)
            group = self._group(job.request)
            n = len(rows)
            try:
                group.add(rows, np.repeat(logits[i:i + 1], n, axis=0), cache, [i] * n)
            except Exception as e:
                self._release(n)
                self._fail(job, e)
                self._fail_group(group, e)

    def _group(self, request: EngineRequest) -> Group:
        key = group_key(request)
        group = self.groups.get(key)
        if group is None:
            chooser = epic_chooser(request.config.horizon, request.config.rollouts) if key != "plain" else None
            group = self.groups[key] = Group(self.model, self.max_running, chooser)
        return group

    def _forget_empty_groups(self) -> None:
        """An empty EPIC group's arena is freed, unless its (horizon, rollouts) was the last used."""
        epic = [k for k, g in self.groups.items() if k != "plain"]
        for k in epic[:-1]:
            if not self.groups[k].rows:
                del self.groups[k]

    def _step(self, group: Group) -> None:
        try:
            outcomes = group.step()
        except Exception as e:
            self._fail_group(group, e)
            return
        self._deliver(outcomes)

    def _fail_group(self, group: Group, error: Exception) -> None:
        rows = group.reset()
        self._release(len(rows))
        for job in {id(r.job): r.job for r in rows}.values():
            self._fail(job, error)

    # -- events -----------------------------------------------------------------------------

    def _deliver(self, outcomes: Sequence[Outcome]) -> None:
        """Each request's events of this step, in one hand-over per request."""
        now = time.perf_counter()
        events: dict[int, tuple[Job, list[Event]]] = {}
        finished = 0
        for o in outcomes:
            row, job = o.row, o.row.job
            job_events = events.setdefault(id(job), (job, []))[1]
            self._timing(job, row, now)
            lp, top = o.logprobs if o.logprobs is not None else (None, None)
            job_events.append(TokenEvent(row.sample_index, o.token, released_text(row, o.finish_reason), lp, top,
                                         o.finish_reason))
            job.completion_tokens += 1
            if o.finish_reason is not None:
                finished += 1
                job_events.append(SampleEvent(row.sample_index, _sample(row, job)))
                job.open_rows -= 1
        self._release(finished)
        for job, evs in events.values():
            self._send(job, evs)
            if job.open_rows == 0 and not job.finished:
                self._done(job, cancelled=False)

    def _timing(self, job: Job, row: EngineRow, now: float) -> None:
        if job.first_token_at is None:
            job.first_token_at = now
            self.observer.first_token(now - job.submitted)
        if row.last_token_at is not None:
            self.observer.token_gap(now - row.last_token_at)
        row.last_token_at = now

    def _send(self, job: Job, events: list[Event]) -> None:
        try:
            job.sink(events)
        except Exception:
            job.cancelled = True

    def _done(self, job: Job, cancelled: bool) -> None:
        if job.finished:
            return
        job.finished = True
        if job.started is not None:
            self.running_jobs -= 1
        status = "cancelled" if cancelled else "completed"
        self.observer.request_done(status, len(job.request.prompt_ids), job.completion_tokens)
        self._send(job, [DoneEvent(len(job.request.prompt_ids), job.completion_tokens, cancelled)])

    def _fail(self, job: Job, error: Exception) -> None:
        if job.finished:
            return
        job.finished = True
        if job.started is not None:
            self.running_jobs -= 1
        self.observer.request_done("failed", len(job.request.prompt_ids), job.completion_tokens)
        self._send(job, [ErrorEvent(error)])

    def _release(self, rows: int) -> None:
        if rows:
            with self.cond:
                self.running_rows -= rows

    def _fail_all(self, error: Exception) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for group in self.groups.values():
            self._fail_group(group, error)
        for job in waiting:
            self._fail(job, error)


def _sample(row: EngineRow, job: Job) -> Sample:
    stats = dict(row.stats)
    stats.update({"tokens": len(row.generated), "seconds": round(time.perf_counter() - (job.started or 0.0), 4)})
    return Sample(row.prompt_index, row.sample_index, row.text, list(row.generated), row.finish_reason or "length", stats)

