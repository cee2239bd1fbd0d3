"""The OpenAI endpoints: read and check the request, hand it to the engine, answer (JSON or SSE).

A thin layer: parsing is `schema.py`, bodies `responses.py`, errors `errors.py`. A client that goes
away cancels its request: a stream's generator is cancelled by Starlette when the client
disconnects, and a non-streaming request watches for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Sequence

from starlette.requests import Request

from ..engine.engine import EventStream
from ..engine.request import DoneEvent, SampleEvent, TokenEvent
from ..errors import EpicOrtError
from .errors import APIError, bad_request, from_engine
from .responses import Reply, chunk, full_response, role_chunk, sse, usage_chunk
from .schema import Parsed, Parser, parse_chat, parse_completion
from .state import ServerState

DISCONNECT_POLL_S = 0.25


async def completions(request: Request) -> Any:
    return await _generate(request, parse_completion, chat=False)


async def chat_completions(request: Request) -> Any:
    return await _generate(request, parse_chat, chat=True)


async def _generate(request: Request, parse: Parser, chat: bool) -> Any:
    from fastapi.responses import JSONResponse, StreamingResponse

    state: ServerState = request.app.state.epic
    state.check_key(request.headers.get("authorization"))
    engine = state.require_engine()
    parsed = parse(await read_json(request, state.settings.max_body_bytes), state)
    streams = _submit(engine, parsed)
    reply = Reply(chat, state.served_model, parsed.requests[0].n)
    if parsed.stream:
        return StreamingResponse(_sse_body(state, reply, parsed, streams), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})
    body = await _until_done_or_gone(request, _collect(state, reply, parsed, streams), streams)
    return JSONResponse(body)


def _submit(engine: Any, parsed: Parsed) -> list[EventStream]:
    """Queue every prompt's request; if one is refused, the others are withdrawn."""
    streams: list[EventStream] = []
    try:
        for r in parsed.requests:
            streams.append(engine.stream(r))
    except Exception as e:
        for s in streams:
            s.cancel()
        raise from_engine(e, param="prompt") from None
    return streams


async def read_json(request: Any, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (declared or streamed), 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON", code="invalid_json") from None


async def merged(streams: Sequence[EventStream]) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, event) from all the prompts' streams, as they come."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    inbox: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: EventStream) -> None:
        try:
            async for event in stream:
                inbox.put_nowait((i, event, None))
        except Exception as e:
            inbox.put_nowait((i, None, e))
            return
        inbox.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, event, error = await inbox.get()
            if error is not None:
                raise error
            if event is None:
                left -= 1
                continue
            yield i, event
    finally:
        for t in tasks:
            t.cancel()


async def _collect(state: ServerState, reply: Reply, parsed: Parsed, streams: list[EventStream]) -> dict[str, Any]:
    n = reply.n
    samples: dict[int, Any] = {}
    events: dict[int, list[TokenEvent]] = {k: [] for k in range(n * len(streams))}
    prompt_tokens = 0
    try:
        async for p, event in merged(streams):
            if isinstance(event, SampleEvent):
                samples[p * n + event.index] = event.sample
            elif isinstance(event, TokenEvent) and parsed.logprobs:
                events[p * n + event.index].append(event)
            elif isinstance(event, DoneEvent):
                prompt_tokens += event.prompt_tokens
    except EpicOrtError as e:
        raise from_engine(e) from None
    ordered = [samples[k] for k in range(n * len(streams))]
    return full_response(reply, ordered, prompt_tokens, state.model, events if parsed.logprobs else None)  # type: ignore[arg-type]


async def _until_done_or_gone(request: Any, work: Any, streams: list[EventStream]) -> Any:
    """Await `work`, cancelling it (and the requests) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the connection", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
        for s in streams:
            s.cancel()


async def _sse_body(state: ServerState, reply: Reply, parsed: Parsed, streams: list[EventStream]) -> AsyncIterator[bytes]:
    """`data: {...}` chunks, then the usage chunk if asked, then `data: [DONE]`. An error after the
    response started is sent as an error chunk (the status is already 200)."""
    n, model = reply.n, state.model
    prompt_tokens = completion_tokens = 0
    try:
        if reply.chat:
            for k in range(n * len(streams)):
                yield sse(role_chunk(reply, k))
        async for p, event in merged(streams):
            if isinstance(event, TokenEvent):
                yield sse(chunk(reply, p * n + event.index, event, model, parsed.logprobs))  # type: ignore[arg-type]
            elif isinstance(event, DoneEvent):
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
        if parsed.include_usage:
            yield sse(usage_chunk(reply, prompt_tokens, completion_tokens))
    except EpicOrtError as e:
        yield sse(from_engine(e).body())
    finally:
        for s in streams:
            s.cancel()
    yield sse("[DONE]")


async def models(request: Request) -> Any:
    from fastapi.responses import JSONResponse

    state: ServerState = request.app.state.epic
    state.check_key(request.headers.get("authorization"))
    return JSONResponse({"object": "list", "data": [{"id": state.served_model, "object": "model", "created": 0,
                                                      "owned_by": "epic-ort"}]})


async def health(request: Request) -> Any:
    """200 when serving; 503 while loading, after a failed load, or while draining."""
    from fastapi.responses import JSONResponse

    state: ServerState = request.app.state.epic
    body: dict[str, Any] = {"replica": state.replica_id, "model": state.served_model}
    if state.draining:
        return JSONResponse({**body, "status": "draining"}, status_code=503)
    if state.load_error is not None:
        return JSONResponse({**body, "status": "error", "error": state.load_error}, status_code=503)
    if state.engine is None:
        return JSONResponse({**body, "status": "loading"}, status_code=503)
    s = state.stats()
    return JSONResponse({**body, "status": "ok", "running_rows": s.running_rows, "queued": s.queued})


async def metrics(request: Request) -> Any:
    from fastapi.responses import Response

    data, content_type = request.app.state.epic.metrics.render()
    return Response(data, media_type=content_type)
