"""`evaluate --methods` specs, read off the settings table: a setting with a `method` key is a method.

`ancestral` is plain sampling, `greedy` argmax, `KEY=VALUE` a setting (`top-p=0.9`, `epic=0.2`,
`epic` alone: the calibrated alpha), and '+' combines them (`temperature=0.7+top-k=50`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import InvalidRequestError
from ..settings import AUTO, GenerationConfig, method_settings, parse_alpha

DEFAULT_METHODS = (
    "epic",  # alpha from the model's calibration
    "temperature=auto",  # the fair rival: temperature fitted by the same calibration to the same target
    "ancestral",
    "temperature=0.7",
    "top-k=50",
    "top-p=0.9",
    "top-p=0.95",
    "min-p=0.05",
    "min-p=0.1",
    "typical-p=0.9",
    "eta=0.0009",
    "epsilon=0.0003",
    "top-n-sigma=1.0",
    "mirostat=5.0",
)
ALIASES = {"temp": "temperature", "typical": "typical-p", "epsilon-cutoff": "epsilon", "eta-cutoff": "eta",
           "mirostat-tau": "mirostat"}
OFF_AT_ZERO = ("epsilon", "eta", "top-n-sigma", "mirostat")  # KEY=0 would be ancestral under another name
Method = tuple[str, dict[str, Any]]


def spec_help() -> str:
    keys = [k for k in method_settings() if k not in ("greedy", "epic")]
    return (f"ancestral, greedy, {', '.join(f'{k}=VALUE' for k in keys)}, epic (calibrated alpha) or epic=ALPHA; "
            "temperature=auto (calibrated); combine with '+', e.g. temperature=0.7+top-k=50")


def parse_method(spec: str) -> Method:
    """A method spec -> (canonical name, GenerationConfig keyword arguments).

    Case and spaces are ignored, `_` may stand for `-`. `epic` alone gives {"alpha": "auto"} and
    `temperature=auto` {"temperature": "auto"}: the evaluation resolves both from the model's
    calibration. Anything else, or a value out of range, raises InvalidRequestError."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequestError(f"empty method spec; use one of: {spec_help()}")
    text = "".join(spec.split()).lower().replace("_", "-")
    kwargs: dict[str, Any] = {}
    names: list[str] = []
    for part in text.split("+"):
        key, eq, raw = part.partition("=")
        key = ALIASES.get(key, key)
        name, value = _parse_part(spec, key, eq, raw)
        if name != "ancestral":
            field_name = method_settings()[key][0]
            if field_name in kwargs:
                raise InvalidRequestError(f"method {spec!r}: {key} given twice")
            kwargs[field_name] = value
        names.append(name)
    if kwargs.get("greedy") and len(names) > 1:
        raise InvalidRequestError(f"method {spec!r}: greedy cannot be combined with other settings")
    if "ancestral" in names and len(names) > 1:
        raise InvalidRequestError(f"method {spec!r}: ancestral means no other settings; drop it or them")
    if "mirostat_eta" in kwargs and "mirostat_tau" not in kwargs:
        raise InvalidRequestError(f"method {spec!r}: mirostat-eta needs mirostat=TAU")
    try:
        GenerationConfig(**{k: (1.0 if k == "temperature" and v == AUTO else v) for k, v in kwargs.items()}).validate()
    except InvalidRequestError as e:
        raise InvalidRequestError(f"method {spec!r}: {e}") from None
    return "+".join(names), kwargs


def _parse_part(spec: str, key: str, eq: str, raw: str) -> tuple[str, Any]:
    """(canonical name, value) of one '+'-separated part."""
    if key == "ancestral" and not eq:
        return "ancestral", None
    if key == "greedy" and not eq:
        return "greedy", True
    if key == "epic" and (not eq or raw == AUTO):
        return "epic", AUTO
    if key == "temperature" and raw == AUTO:
        return "temperature=auto", AUTO
    table = method_settings()
    if key not in table or table[key][1].kind == "bool":
        raise InvalidRequestError(f"unknown method {key!r} in {spec!r}; use {spec_help()}")
    if not eq or not raw:
        raise InvalidRequestError(f"method {spec!r}: {key} needs a value, e.g. {key}=0.9")
    kind = table[key][1].kind
    try:
        value = parse_alpha(raw) if kind == "alpha" else (int(raw) if kind == "int" else float(raw))
    except (ValueError, InvalidRequestError):
        what = "an integer" if kind == "int" else "a number"
        raise InvalidRequestError(f"method {spec!r}: {key} must be {what}, not {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"method {spec!r}: {key} must be a finite number")
    if key == "top-k" and value < 1:
        raise InvalidRequestError(f"method {spec!r}: top-k must be >= 1")
    if key in OFF_AT_ZERO and value == 0:
        raise InvalidRequestError(f"method {spec!r}: {key}=0 turns it off; use ancestral for plain sampling")
    return f"{key}={raw}", value


def parse_methods(specs: str | Sequence[str] | None) -> list[Method]:
    """A comma-separated string or a list of specs (None: the defaults) -> parsed methods,
    refusing an empty list and duplicates."""
    if specs is None:
        specs = list(DEFAULT_METHODS)
    elif isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    parsed = [parse_method(s) for s in specs]
    if not parsed:
        raise InvalidRequestError(f"no methods given; use {spec_help()}")
    names = [n for n, _ in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError(f"method(s) given twice: {', '.join(dupes)}")
    return parsed
