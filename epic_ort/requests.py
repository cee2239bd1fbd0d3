"""JSONL requests (`generate --input`): one request a line, prompt plus optional settings.

A line's settings override the command line's. Bad lines are reported with their number and
skipped (or stop everything with --strict); results carry `request_index` so a killed run can be
resumed by skipping requests whose samples are all in the output already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidRequestError
from .settings import GenerationConfig, setting_fields

_OTHER_KEYS = {"prompt", "id", "num_samples", "chat"}


def request_keys() -> set[str]:
    """Every key a request line may have: the settings (settings.py) and the request's own."""
    return {f.name for f, _ in setting_fields()} | _OTHER_KEYS


@dataclass
class Request:
    index: int  # 0-based count of non-blank lines before this one (see read_requests)
    line: int  # 1-based line number in the file
    prompt: str
    config: GenerationConfig
    num_samples: int
    chat: bool
    id: Any = None


def parse_request(obj: Any, index: int, line: int, defaults: GenerationConfig, num_samples: int, chat: bool) -> Request:
    if not isinstance(obj, dict):
        raise InvalidRequestError("a request must be a JSON object with at least a \"prompt\"")
    unknown = set(obj) - request_keys()
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(sorted(unknown))}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequestError("\"prompt\" must be a string")
    config = defaults.updated({k: v for k, v in obj.items() if k not in _OTHER_KEYS})
    n = obj.get("num_samples", num_samples)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidRequestError("\"num_samples\" must be an integer >= 1")
    use_chat = obj.get("chat", chat)
    if not isinstance(use_chat, bool):
        raise InvalidRequestError("\"chat\" must be true or false")
    return Request(index, line, prompt, config, n, use_chat, obj.get("id"))


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
