"""Every sampling setting, declared once: `GenerationConfig`'s fields.

Each field carries its default, type, range and help, and for a logits processor the class it builds
and the value at which it is skipped. Everything that takes settings from outside reads this table:
the CLI's options (`cli/options.py`), the keys of a JSONL request (`requests.py`), the method specs of
`evaluate` (`evaluation/methods.py`) and the HTTP fields of the server. Adding a sampler is one processor
class plus one field here; the field's position is where its processor runs in the chain: transformers'
order (temperature, top-k, top-p, min-p, typical, epsilon, eta), with llama.cpp's top-nσ ahead of the
other cuts as in llama.cpp's default chain (it does not depend on the temperature, so before or after
it is the same). Mirostat is not a processor but a token chooser (`chooser.MirostatChooser`) that
samples from the processed scores.

`alpha` is a number or "auto" (calibrated on real text); `epic_ort.resolve_alpha`
(calibration/store.py) is the one place that turns "auto" into a number, at the edges (CLI, evaluate,
the server), above the decode loop: calibrating means decoding.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, Literal, Mapping, Sequence

from .errors import InvalidRequestError
from .sampling.processors import (
    LogitsProcessor,
    MinPProcessor,
    ProcessorList,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    TypicalProcessor,
)
from .sampling.truncation import EpsilonProcessor, EtaProcessor, TopNSigmaProcessor

AUTO = "auto"
Alpha = float | Literal["auto"]


@dataclass(frozen=True)
class SettingSpec:
    """What the outside world needs to know about one setting."""

    kind: str  # int | float | bool | str | strings | optional-int | alpha
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes `low`
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    processor: type[LogitsProcessor] | None = None  # built from the value, unless it equals `identity`
    identity: Any = None
    method: str | None = None  # key in `evaluate --methods` specs (e.g. "top-p"), None: not a method setting
    http: str | None = None  # the request field of the HTTP API, where its name differs
    flag: str | None = None  # the CLI option, where it differs from --name-with-dashes


def setting(default: Any, kind: str, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"setting": SettingSpec(kind=kind, help=help, **spec)})


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides which tokens come out (apart from the model and the prompts)."""

    max_new_tokens: int = setting(128, "int", "New tokens per sample, at most.", low=1, http="max_tokens")
    greedy: bool = setting(False, "bool", "Argmax decoding (no sampling, no processors).", method="greedy")
    temperature: float = setting(1.0, "float", "Divide the logits by this (transformers' temperature warper).",
                                 low=0, low_open=True, processor=TemperatureProcessor, identity=1.0,
                                 method="temperature")
    top_n_sigma: float = setting(0.0, "float", "Top-nσ: keep the logits within n standard deviations of the largest; "
                                 "the same cut at any temperature (0: off).", low=0, processor=TopNSigmaProcessor,
                                 identity=0.0, method="top-n-sigma")
    top_k: int = setting(0, "int", "Keep the k most likely tokens (0: all).", low=0, processor=TopKProcessor,
                         identity=0, method="top-k")
    top_p: float = setting(1.0, "float", "Nucleus: keep the most likely tokens holding this mass.", low=0, high=1,
                           low_open=True, processor=TopPProcessor, identity=1.0, method="top-p")
    min_p: float = setting(0.0, "float", "Drop tokens less likely than min_p times the most likely one.", low=0,
                           high=1, processor=MinPProcessor, identity=0.0, method="min-p")
    typical_p: float = setting(1.0, "float", "Locally typical sampling: keep this mass of the most typical tokens.",
                               low=0, high=1, low_open=True, processor=TypicalProcessor, identity=1.0,
                               method="typical-p")
    epsilon_cutoff: float = setting(0.0, "float", "ε-sampling: drop tokens less likely than this probability, e.g. "
                                    "3e-4 (0: off).", low=0, high=1, high_open=True, processor=EpsilonProcessor,
                                    identity=0.0, method="epsilon")
    eta_cutoff: float = setting(0.0, "float", "η-sampling: drop tokens below min(eta, sqrt(eta)·exp(-entropy)), a "
                                "cut that loosens when the model is unsure, e.g. 9e-4 (0: off).", low=0, high=1,
                                high_open=True, processor=EtaProcessor, identity=0.0, method="eta")
    mirostat_tau: float = setting(0.0, "float", "Mirostat v2: hold the surprise near this many bits per token by "
                                  "adapting the cut each step (llama.cpp's default 5.0; 0: off).", low=0,
                                  method="mirostat")
    mirostat_eta: float = setting(0.1, "float", "Mirostat v2: learning rate of its surprise controller.", low=0,
                                  low_open=True, method="mirostat-eta")
    stop: tuple[str, ...] = setting((), "strings", "Stop string (repeatable); the text ends before it. EOS always stops.")
    seed: int | None = setting(None, "optional-int", "Random seed: the same seed gives the same tokens.")
    alpha: Alpha = setting(0.0, "alpha", "EPIC strength: a number, or 'auto' (calibrated on real text). 0: plain "
                           "sampling.", method="epic")
    horizon: int = setting(4, "int", "EPIC: lookahead tokens k behind each candidate.", low=1)
    rollouts: int = setting(2, "int", "EPIC: rollouts R per candidate.", low=1)
    truncate: str = setting("error", "str", "A prompt longer than the context: refuse it (error) or keep its end "
                            "(left).", choices=("error", "left"))

    def validate(self) -> None:
        """InvalidRequestError naming the first setting that has the wrong type or is out of range."""
        for f, spec in setting_fields():
            check_value(f.name, spec, getattr(self, f.name))
        if not self.greedy and not self.temperature > 0:
            raise InvalidRequestError("temperature must be > 0 (use greedy for argmax decoding)")
        if self.mirostat_tau > 0 and self.greedy:
            raise InvalidRequestError("mirostat samples: it cannot be combined with greedy (drop one of them)")
        if self.mirostat_tau > 0 and self.alpha != 0:
            raise InvalidRequestError("mirostat and EPIC (alpha != 0) both choose the token: set alpha 0 or "
                                      "mirostat_tau 0")

    @property
    def uses_epic(self) -> bool:
        return not self.greedy and self.alpha != 0

    @property
    def uses_mirostat(self) -> bool:
        return not self.greedy and self.mirostat_tau > 0

    def processors(self) -> ProcessorList:
        """The logits processors of this configuration, in declaration order (none for greedy)."""
        out = ProcessorList()
        if self.greedy:
            return out
        for f, spec in setting_fields():
            value = getattr(self, f.name)
            if spec.processor is not None and value != spec.identity:
                out.append(spec.processor(value))
        return out

    def updated(self, values: Mapping[str, Any]) -> "GenerationConfig":
        """A copy with `values` (setting name -> value, e.g. from JSON) type-checked and validated."""
        specs = dict((f.name, s) for f, s in setting_fields())
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise InvalidRequestError(f"unknown setting(s) {', '.join(unknown)}")
        clean = {k: coerce(k, specs[k], v) for k, v in values.items()}
        config = replace(self, **clean)
        config.validate()
        return config


def setting_fields() -> list[tuple[Field, SettingSpec]]:
    """(dataclass field, its spec) for every setting, in declaration order."""
    return [(f, f.metadata["setting"]) for f in fields(GenerationConfig)]


def default_of(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def coerce(name: str, spec: SettingSpec, value: Any) -> Any:
    """A value from JSON (or a Python caller) as the setting's type; InvalidRequestError if it is not one."""
    kind = spec.kind
    if kind == "int" or (kind == "optional-int" and value is not None):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name} must be an integer")
        return int(value)
    if kind == "float":
        return _number(name, value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidRequestError(f"{name} must be true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be a string")
        return value
    if kind == "strings":
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise InvalidRequestError(f"{name} must be a string or a list of strings")
        return tuple(items)
    if kind == "alpha":
        return parse_alpha(value)
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number")
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number")
    return float(value)


def parse_alpha(value: Any) -> Alpha:
    """A number or "auto" (strings that are numbers, as on a command line, too)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidRequestError(f"alpha must be a number or 'auto', not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError("alpha must be a number or \"auto\"")
    if not math.isfinite(value):
        raise InvalidRequestError("alpha must be a finite number")
    return float(value)


def check_value(name: str, spec: SettingSpec, value: Any) -> None:
    coerce(name, spec, value)
    if spec.choices is not None and value not in spec.choices:
        raise InvalidRequestError(f"{name} must be one of {', '.join(spec.choices)}, not {value!r}")
    if spec.kind not in ("int", "float") or (spec.low is None and spec.high is None):
        return
    lo_ok = spec.low is None or (value > spec.low if spec.low_open else value >= spec.low)
    hi_ok = spec.high is None or (value < spec.high if spec.high_open else value <= spec.high)
    if not (lo_ok and hi_ok):
        raise InvalidRequestError(f"{name} must be {describe_range(spec)}, not {value}")


def describe_range(spec: SettingSpec) -> str:
    if spec.high is None:
        return f"{'>' if spec.low_open else '>='} {_num(spec.low)}"
    if spec.low is None:
        return f"{'<' if spec.high_open else '<='} {_num(spec.high)}"
    left, right = "(" if spec.low_open else "[", ")" if spec.high_open else "]"
    return f"in {left}{_num(spec.low)}, {_num(spec.high)}{right}"


def _num(x: float | None) -> str:
    return f"{x:g}"


def method_settings() -> dict[str, tuple[str, SettingSpec]]:
    """evaluate's method keys -> (setting name, spec)."""
    return {spec.method: (f.name, spec) for f, spec in setting_fields() if spec.method}


def processor_settings() -> Sequence[str]:
    """Names of the settings that build a logits processor, in chain order."""
    return [f.name for f, spec in setting_fields() if spec.processor is not None]

