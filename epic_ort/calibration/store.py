"""epic_calibration.json: reading it back, refusing one that does not fit, and `--alpha auto`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import CalibrationError
from ..runtime.model import CausalLM
from .calibrate import CALIBRATION_NAME

REQUIRED = ("alpha", "alpha_se", "horizon", "rollouts", "model_sha256")


def read_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The calibration in the folder, None if there is none; CalibrationError if it is corrupt."""
    path = Path(model_dir) / CALIBRATION_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        alpha = float(data["alpha"])
        if alpha != alpha or abs(alpha) == float("inf"):
            raise ValueError("alpha is not finite")
    except (ValueError, TypeError) as e:
        raise CalibrationError(
            f"{path} is corrupt ({e}); delete it or run `epic-ort calibrate {model_dir}` again"
        ) from None
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


def resolve_auto_alpha(model: CausalLM, horizon: int, rollouts: int, *, show_progress: bool | None = None) -> float:
    """alpha for `--alpha auto`: from the model's calibration, calibrating on the default corpus
    first (and caching the result) when there is none."""
    data = read_calibration(model.model_dir)
    if data is None:
        from .calibrate import CalibrationSettings, calibrate

        print(
            f"epic-ort: no {CALIBRATION_NAME} in {model.model_dir}; calibrating alpha on the default corpus "
            f"(horizon {horizon}, rollouts {rollouts}), once",
            file=sys.stderr,
        )
        data = calibrate(model, None, CalibrationSettings(horizon=horizon, rollouts=rollouts),
                         show_progress=True if show_progress is None else show_progress)
        print(f"epic-ort: alpha = {data['alpha']:.4f} ± {data['alpha_se']:.4f}", file=sys.stderr)
    check_calibration(data, model, horizon, rollouts)
    return float(data["alpha"])
