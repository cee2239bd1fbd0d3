"""OpenAI request bodies -> engine requests, checked field by field (400 naming the field).

Every setting of the settings table is a request field, under its `http` name where it differs
(max_new_tokens -> max_tokens), read off `settings.setting_fields()`: a sampler added to the table
is served with no change here. Besides those, OpenAI's fields: model, prompt / messages, n, stream,
stream_options, logprobs / top_logprobs, presence_penalty, frequency_penalty, logit_bias (these three
are logits processors of the engine, OpenAI semantics), max_completion_tokens (chat), user.
`temperature: 0` means greedy, as in OpenAI's API. Unknown fields are refused, so that a typo is
not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from ..decoding import encode_prompts
from ..engine.request import EngineRequest, fit_prompt
from ..errors import CalibrationError, InvalidRequestError
from ..runtime.model import CausalLM
from ..settings import (
    AUTO,
    Alpha,
    GenerationConfig,
    SettingSpec,
    check_value,
    coerce,
    setting_fields,
)
from .errors import APIError, bad_request

COMMON = {"model", "n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "user"}
COMPLETION_ONLY = {"prompt", "logprobs", "echo", "suffix", "best_of"}
CHAT_ONLY = {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


class Context(Protocol):
    """What parsing needs to know about the server."""

    model: CausalLM
    served_model: str
    max_n: int
    default_alpha: Alpha

    def alpha_for(self, horizon: int, rollouts: int) -> float: ...


@dataclass
class Parsed:
    """One HTTP request: an engine request per prompt, and how to answer."""

    requests: list[EngineRequest]
    stream: bool
    include_usage: bool
    logprobs: bool


def http_settings() -> dict[str, tuple[str, SettingSpec]]:
    """HTTP field -> (setting name, spec), for every setting of the table."""
    return {spec.http or f.name: (f.name, spec) for f, spec in setting_fields()}


def parse_completion(body: Any, ctx: Context) -> Parsed:
    body = _object(body)
    _known(body, COMMON | COMPLETION_ONLY)
    if body.get("echo"):
        raise bad_request("echo is not supported", param="echo")
    if body.get("suffix"):
        raise bad_request("suffix is not supported", param="suffix")
    n = _n(body, ctx)
    if body.get("best_of") not in (None, n):
        raise bad_request("best_of must equal n (or be left out)", param="best_of")
    config = parse_config(body, ctx)
    prompts = _completion_prompts(body.get("prompt"), ctx.model, config.truncate)
    logprobs = _optional_int(body, "logprobs", 0, 20)
    return _parsed(body, ctx, prompts, config, n, logprobs)


def parse_chat(body: Any, ctx: Context) -> Parsed:
    body = _object(body)
    _known(body, COMMON | CHAT_ONLY)
    if "max_completion_tokens" in body:
        body = dict(body)
        body["max_tokens"] = body.pop("max_completion_tokens")
    n = _n(body, ctx)
    config = parse_config(body, ctx)
    messages = _messages(body.get("messages"))
    try:
        ids = fit_prompt(ctx.model, ctx.model.encode_chat(messages), config.truncate)
    except InvalidRequestError as e:
        raise bad_request(str(e), param="messages") from None
    want = _bool(body, "logprobs", False)
    top = _optional_int(body, "top_logprobs", 0, 20)
    if top is not None and not want:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    return _parsed(body, ctx, [ids], config, n, (top or 0) if want else None)


def _parsed(body: dict[str, Any], ctx: Context, prompts: list[list[int]], config: GenerationConfig, n: int,
            logprobs: int | None) -> Parsed:
    presence = _number(body, "presence_penalty", -2, 2)
    frequency = _number(body, "frequency_penalty", -2, 2)
    bias = _logit_bias(body.get("logit_bias"))
    requests = [EngineRequest(ids, config, n=n, logprobs=logprobs, presence_penalty=presence,
                              frequency_penalty=frequency, logit_bias=bias, prompt_index=p)
                for p, ids in enumerate(prompts)]
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    include_usage = _bool(options or {}, "include_usage", False, param="stream_options.include_usage")
    model = body.get("model")
    if model is not None and model != ctx.served_model:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {ctx.served_model!r}",
                       param="model", code="model_not_found")
    return Parsed(requests, _bool(body, "stream", False), include_usage, logprobs is not None)


def parse_config(body: dict[str, Any], ctx: Context) -> GenerationConfig:
    """The table's settings from the body (null: the default), each checked on its own, then
    together. alpha: the request's, else the server's default (unless that conflicts with what the
    request asks for, e.g. mirostat: then plain); "auto" becomes the calibrated number."""
    values: dict[str, Any] = {}
    for http, (name, spec) in http_settings().items():
        value = body.get(http)
        if value is None:
            continue
        if name == "temperature" and not isinstance(value, bool) and value == 0:
            values["greedy"] = True  # OpenAI: temperature 0 is argmax decoding
            continue
        try:
            value = coerce(http, spec, value)
            check_value(http, spec, value)
        except InvalidRequestError as e:
            raise bad_request(str(e), param=http) from None
        values[name] = value
    explicit = "alpha" in values
    if not explicit:
        values["alpha"] = ctx.default_alpha
    try:
        return _resolved(GenerationConfig().updated(values), ctx)
    except InvalidRequestError as e:
        if explicit:
            raise bad_request(str(e), param=_param_of(str(e))) from None
    values.pop("alpha")
    try:
        return GenerationConfig().updated(values)
    except InvalidRequestError as e:
        raise bad_request(str(e), param=_param_of(str(e))) from None


def _resolved(config: GenerationConfig, ctx: Context) -> GenerationConfig:
    if config.alpha != AUTO:
        return config
    try:
        alpha = ctx.alpha_for(config.horizon, config.rollouts)
    except CalibrationError as e:
        raise bad_request(f"alpha 'auto' cannot be served here: {e}", param="alpha") from None
    config = replace(config, alpha=alpha)
    config.validate()
    return config


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0]
    return head if head in http_settings() or head in COMMON else None


def _completion_prompts(prompt: Any, model: CausalLM, truncate: str) -> list[list[int]]:
    """str, [str, ...], [int, ...] (token ids) or [[int, ...], ...], as offline encode_prompts does."""
    if prompt is None:
        raise bad_request("prompt is required", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else prompt
        try:
            return encode_prompts(model, texts, False, truncate)
        except InvalidRequestError as e:
            raise bad_request(str(e), param="prompt") from None
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
        try:
            return [fit_prompt(model, list(p), truncate) for p in prompt]
        except InvalidRequestError as e:
            raise bad_request(str(e), param="prompt") from None
    raise bad_request("prompt must be a non-empty string, a list of strings, or token ids", param="prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages; a content given as parts keeps its text parts."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"message {i}: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise bad_request(f"message {i} must be an object with a string role and content", param="messages")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise bad_request("the messages are empty", param="messages")
    return out


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _known(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed - set(http_settings()))
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])


def _n(body: dict[str, Any], ctx: Context) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or n < 1:
        raise bad_request("n must be an integer >= 1", param="n")
    if n > ctx.max_n:
        raise bad_request(f"n must be at most {ctx.max_n} on this server", param="n")
    return int(n)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise bad_request(f"{name} must be an integer in [{low}, {high}]", param=name)
    return int(value)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"{name} must be a number in [{low:g}, {high:g}]", param=name)
    return float(value)


def _bool(body: dict[str, Any], name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{param or name} must be true or false", param=param or name)
    return value


def _logit_bias(bias: Any) -> dict[int, float] | None:
    """{"token id": bias in [-100, 100]} (JSON keys are strings)."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad_request("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request("logit_bias values must be numbers in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


Parser = Callable[[Any, Context], Parsed]
