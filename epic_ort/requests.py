"""JSONL requests (`generate --input`): one request a line, prompt plus optional settings.

A line's settings override the command line's. Bad lines are reported with their number and
skipped (or stop everything with --strict); results carry `request_index` so a killed run can be
resumed by skipping requests whose samples are all in the output already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator

from .decoding import GenerationConfig
from .errors import InvalidRequestError

_CONFIG_KEYS = {f.name for f in fields(GenerationConfig)} - {"truncate"}
_OTHER_KEYS = {"prompt", "id", "num_samples", "chat", "truncate"}


@dataclass
class Request:
    index: int  # 0-based line number among non-blank lines... see read_requests
    line: int  # 1-based line number in the file
    prompt: str
    config: GenerationConfig
    num_samples: int
    chat: bool
    id: Any = None


def parse_request(obj: Any, index: int, line: int, defaults: GenerationConfig, num_samples: int, chat: bool) -> Request:
    if not isinstance(obj, dict):
        raise InvalidRequestError("a request must be a JSON object with at least a \"prompt\"")
    unknown = set(obj) - _CONFIG_KEYS - _OTHER_KEYS
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(sorted(unknown))}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError("\"prompt\" must be a string")
    overrides = {k: obj[k] for k in _CONFIG_KEYS if k in obj}
    if "stop" in overrides:
        stop = overrides["stop"]
        overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if "truncate" in obj:
        overrides["truncate"] = obj["truncate"]
    try:
        config = replace(defaults, **overrides)
        auto = config.alpha == "auto"
        if not auto and (isinstance(config.alpha, bool) or not isinstance(config.alpha, (int, float))):
            raise InvalidRequestError("\"alpha\" must be a number or \"auto\"")
        for key in ("max_new_tokens", "top_k", "horizon", "rollouts"):
            if not isinstance(getattr(config, key), int) or isinstance(getattr(config, key), bool):
                raise InvalidRequestError(f"\"{key}\" must be an integer")
        replace(config, alpha=0.0).validate() if auto else config.validate()
    except TypeError as e:
        raise InvalidRequestError(str(e)) from None
    n = obj.get("num_samples", num_samples)
    if not isinstance(n, int) or n < 1:
        raise InvalidRequestError("\"num_samples\" must be an integer >= 1")
    return Request(index, line, prompt, config, n, bool(obj.get("chat", chat)), obj.get("id"))


def read_requests(path: Path, defaults: GenerationConfig, num_samples: int, chat: bool
                  ) -> Iterator[Request | tuple[int, str]]:
    """Yield a Request per good line, or (line number, error) per bad one. Blank lines are skipped;
    request_index is the 0-based count of non-blank lines, stable across edits of blank lines."""
    index = 0
    with open(path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                yield parse_request(obj, index, line_no, defaults, num_samples, chat)
            except json.JSONDecodeError as e:
                yield (line_no, f"not valid JSON ({e.msg})")
            except InvalidRequestError as e:
                yield (line_no, str(e))
            index += 1


def completed_requests(output: Path) -> tuple[dict[int, set[int]], list[str]]:
    """(request_index -> sample indices present, the valid lines) from an earlier run's output.
    A last line cut off by a kill is dropped."""
    done: dict[int, set[int]] = {}
    good: list[str] = []
    if not output.is_file():
        return done, good
    for raw in output.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(raw)
            done.setdefault(int(obj["request_index"]), set()).add(int(obj["sample_index"]))
            good.append(raw)
        except (ValueError, KeyError, TypeError):
            continue
    return done, good
