"""epic_calibration.json: reading it back, refusing one that does not fit, and `--alpha auto`."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CalibrationError
from ..runtime.model import CausalLM
from ..settings import AUTO, GenerationConfig
from .targets import CALIBRATION_NAME, DEFAULT_TARGET, FORMAT, calibrate

REQUIRED = ("alpha", "alpha_se", "horizon", "rollouts", "model_sha256", "target")


class OutdatedCalibration(CalibrationError):
    """A calibration file of an older epic-ort (another format or target set): recalibrate."""


def read_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The calibration in the folder, None if there is none; CalibrationError if it is corrupt,
    OutdatedCalibration if an older epic-ort wrote it."""
    path = Path(model_dir) / CALIBRATION_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, TypeError) as e:
        raise CalibrationError(f"{path} is corrupt ({e}); delete it or run `epic-ort calibrate {model_dir}` again") from None
    if data.get("format") != FORMAT:
        raise OutdatedCalibration(
            f"{path} was made by an older epic-ort ({data.get('format', 'no format')}, target "
            f"{data.get('target', 'lookahead')}); run `epic-ort calibrate {model_dir}` again")
    try:
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        alpha = float(data["alpha"])
        if alpha != alpha or abs(alpha) == float("inf"):
            raise ValueError("alpha is not finite")
    except (ValueError, TypeError) as e:
        raise CalibrationError(f"{path} is corrupt ({e}); delete it or run `epic-ort calibrate {model_dir}` again") from None
    return data


def check_calibration(data: dict[str, Any], model: CausalLM, horizon: int, rollouts: int) -> None:
    path = Path(model.model_dir) / CALIBRATION_NAME
    if data["model_sha256"] != model.manifest.model_sha256:
        raise CalibrationError(
            f"{path} was made for another model (hash {str(data['model_sha256'])[:12]}…); "
            f"run `epic-ort calibrate {model.model_dir}` again"
        )
    if int(data["horizon"]) != horizon or int(data["rollouts"]) != rollouts:
        raise CalibrationError(
            f"{path} was made for horizon {data['horizon']}, rollouts {data['rollouts']}, not {horizon}, {rollouts}; "
            f"use those or run `epic-ort calibrate {model.model_dir} --horizon {horizon} --rollouts {rollouts}`"
        )


def _say(msg: str) -> None:
    print(f"epic-ort: {msg}", file=sys.stderr)


def calibration_for(model: CausalLM, horizon: int, rollouts: int, *, show_progress: bool | None = None
                    ) -> dict[str, Any]:
    """The model's calibration for (horizon, rollouts): the file's, or, when there is none or an older
    epic-ort wrote it, a fresh one on the default corpus with the default target (written, once)."""
    try:
        data = read_calibration(model.model_dir)
    except OutdatedCalibration as e:
        _say(f"{str(e).split(';')[0]}; recalibrating")
        data = None
    if data is None:
        _say(f"no usable {CALIBRATION_NAME} in {model.model_dir}; calibrating on the default corpus "
             f"(target {DEFAULT_TARGET}, horizon {horizon}, rollouts {rollouts}), once")
        data = calibrate(model, None, DEFAULT_TARGET, horizon=horizon, rollouts=rollouts,
                         show_progress=True if show_progress is None else show_progress)
        _say(f"alpha = {data['alpha']:.4f} ± {data['alpha_se']:.4f}")
    check_calibration(data, model, horizon, rollouts)
    return data


def resolve_alpha(model: CausalLM, config: GenerationConfig, *, show_progress: bool | None = None) -> GenerationConfig:
    """`config` with alpha "auto" replaced by the model's calibrated alpha (calibrating first, once, when
    the model folder has none); any other config as it is. The one place "auto" becomes a number."""
    if config.alpha != AUTO:
        return config
    return replace(config, alpha=resolve_auto_alpha(model, config.horizon, config.rollouts, show_progress=show_progress))


def resolve_auto_alpha(model: CausalLM, horizon: int, rollouts: int, *, show_progress: bool | None = None) -> float:
    """alpha for `--alpha auto`."""
    return float(calibration_for(model, horizon, rollouts, show_progress=show_progress)["alpha"])


def resolve_auto_temperature(model: CausalLM, horizon: int = 4, rollouts: int = 2, *,
                             show_progress: bool | None = None) -> float:
    """The temperature fitted to the same target as alpha (evaluate's `temperature=auto`)."""
    data = calibration_for(model, horizon, rollouts, show_progress=show_progress)
    if "temperature" not in data:
        raise CalibrationError(f"{Path(model.model_dir) / CALIBRATION_NAME} has no temperature (target "
                               f"{data['target']}); run `epic-ort calibrate {model.model_dir} --target entce`")
    return float(data["temperature"])
