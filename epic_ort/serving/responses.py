"""OpenAI response bodies and stream chunks, built from the engine's events.

Choice k of a request with several prompts is prompt k // n, sample k % n, as in OpenAI's API.
finish_reason: eos and stop strings are "stop", the token budget or the context "length".
Logprobs are the model's raw distribution (before processors or EPIC).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..decoding import Sample
from ..engine.request import TokenEvent
from ..runtime.model import CausalLM

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class Reply:
    """What one HTTP request's answer needs: its kind, id, model."""

    chat: bool
    model: str
    n: int
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def head(self) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": self.object, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(reply: Reply, samples: Sequence[Sample], prompt_tokens: int, model: CausalLM,
                  events: dict[int, list[TokenEvent]] | None) -> dict[str, Any]:
    """The non-streaming body: every choice, in choice order, and the usage."""
    choices = []
    for k, s in enumerate(samples):
        lp = logprobs_block(reply.chat, events[k], model) if events is not None else None
        if reply.chat:
            choices.append({"index": k, "message": {"role": "assistant", "content": s.text}, "logprobs": lp,
                            "finish_reason": FINISH[s.finish_reason]})
        else:
            choices.append({"index": k, "text": s.text, "logprobs": lp, "finish_reason": FINISH[s.finish_reason]})
    return {**reply.head(), "choices": choices, "usage": usage(prompt_tokens, sum(len(s.token_ids) for s in samples))}


def chunk(reply: Reply, choice: int, event: TokenEvent, model: CausalLM, with_logprobs: bool) -> dict[str, Any]:
    """One stream chunk for one token of one choice."""
    lp = logprobs_block(reply.chat, [event], model) if with_logprobs else None
    finish = FINISH[event.finish_reason] if event.finish_reason else None
    head = {**reply.head(), "object": "chat.completion.chunk" if reply.chat else "text_completion"}
    if reply.chat:
        return {**head, "choices": [{"index": choice, "delta": {"content": event.text}, "logprobs": lp,
                                     "finish_reason": finish}]}
    return {**head, "choices": [{"index": choice, "text": event.text, "logprobs": lp, "finish_reason": finish}]}


def role_chunk(reply: Reply, choice: int) -> dict[str, Any]:
    """A chat stream opens each choice with the assistant role."""
    return {**reply.head(), "object": "chat.completion.chunk",
            "choices": [{"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]}


def usage_chunk(reply: Reply, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if reply.chat else "text_completion"
    return {**reply.head(), "object": obj, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def logprobs_block(chat: bool, events: Sequence[TokenEvent], model: CausalLM) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's `content` list, or completions' parallel lists."""
    if chat:
        return {"content": [{"token": _piece(model, e.token_id), "logprob": e.logprob,
                             "bytes": list(_piece(model, e.token_id).encode("utf-8")),
                             "top_logprobs": [{"token": _piece(model, t), "logprob": lp,
                                               "bytes": list(_piece(model, t).encode("utf-8"))}
                                              for t, lp in (e.top_logprobs or ())]} for e in events]}
    offsets, at = [], 0
    for e in events:
        offsets.append(at)
        at += len(e.text)
    return {"tokens": [_piece(model, e.token_id) for e in events], "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{_piece(model, t): lp for t, lp in (e.top_logprobs or ())} for e in events],
            "text_offset": offsets}


def _piece(model: CausalLM, token: int) -> str:
    return model.decode([token], skip_special_tokens=False)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {...}` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")
