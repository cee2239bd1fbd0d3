"""Click options generated from the settings table (epic_ort/settings.py), so that a setting is
declared once: its flag, type, range, default and help all come from `GenerationConfig`'s field."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..errors import InvalidRequestError
from ..runtime.providers import PROVIDERS
from ..settings import GenerationConfig, SettingSpec, default_of, parse_alpha, setting_fields

PROVIDER = click.Choice(list(PROVIDERS))


class AlphaType(click.ParamType):
    """A number or 'auto'."""

    name = "FLOAT|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return parse_alpha(value)
        except InvalidRequestError as e:
            self.fail(str(e), param, ctx)


def flag_of(name: str, spec: SettingSpec) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def _click_type(spec: SettingSpec) -> Any:
    if spec.choices is not None:
        return click.Choice(list(spec.choices))
    if spec.kind == "int":
        return click.IntRange(min=spec.low, max=spec.high, min_open=spec.low_open, max_open=spec.high_open)
    if spec.kind == "float":
        if spec.low is None and spec.high is None:
            return float
        return click.FloatRange(min=spec.low, max=spec.high, min_open=spec.low_open, max_open=spec.high_open)
    if spec.kind == "optional-int":
        return int
    if spec.kind == "alpha":
        return AlphaType()
    return str


def setting_option(name: str, **overrides: Any) -> Callable[[Any], Any]:
    """The Click option of one setting (overrides: a different default, say)."""
    f, spec = next((f, s) for f, s in setting_fields() if f.name == name)
    kwargs: dict[str, Any] = {"help": spec.help}
    if spec.kind == "bool":
        kwargs.update(is_flag=True, default=default_of(f))
    elif spec.kind == "strings":
        kwargs.update(multiple=True, type=str)
    else:
        kwargs.update(type=_click_type(spec), default=default_of(f), show_default=default_of(f) is not None)
    kwargs.update(overrides)
    return click.option(flag_of(name, spec), name, **kwargs)


def generation_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every setting of GenerationConfig as an option, in the table's order."""
    for f, _ in reversed(setting_fields()):
        func = setting_option(f.name)(func)
    return func


def config_from(kwargs: dict[str, Any]) -> GenerationConfig:
    """Pop the settings' values out of a command's keyword arguments into a GenerationConfig."""
    values = {f.name: kwargs.pop(f.name) for f, _ in setting_fields() if f.name in kwargs}
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    return GenerationConfig().updated(values)
