"""`epic-ort calibrate`: the calibration targets, and the file they write (epic_calibration.json).

- "entce" (the default): closed loop (closed_loop.py). alpha, and for the temperature baseline a
  temperature, such that the model's own generations from calibration contexts are as surprising to
  it as the human continuations are: the target of the entropy-calibration error.
- "lookahead": the one-step target (calibrate.py): the lookahead entropy after the human's token
  matched at real-text contexts. Cheaper, but blind to the drift of a sampler's own generations.

Which generalizes better to held-out text is measured in docs/ (README, "Results so far").
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError
from ..fileio import write_json_atomic
from ..runtime.model import CausalLM
from .calibrate import CalibrationSettings, calibrate_lookahead
from .closed_loop import ClosedLoopSettings, fit_knob, human_log_loss
from .corpus import load_corpus

CALIBRATION_NAME = "epic_calibration.json"
FORMAT = "epic-ort-calibration/3"  # 3: entce records target_contexts (closed_loop.py)
TARGETS = ("entce", "lookahead")
DEFAULT_TARGET = "entce"


def calibrate(model: CausalLM, corpus_paths: Sequence[str | os.PathLike] | None = None, target: str = DEFAULT_TARGET,
              *, horizon: int = 4, rollouts: int = 2, seed: int = 0, contexts: int | None = None,
              context_tokens: int | None = None, new_tokens: int | None = None, passes: int | None = None,
              target_contexts: int | None = None, write: bool = True, show_progress: bool | None = None) -> dict[str, Any]:
    """Fit the calibration for `target` on the corpus (default: the one shipped with epic-ort) and
    write it, atomically, into the model folder. Unset sizes take the target's defaults."""
    if target not in TARGETS:
        raise InvalidRequestError(f"unknown calibration target {target!r}; choose one of {', '.join(TARGETS)}")
    corpus = load_corpus(model, corpus_paths)
    sizes = {k: v for k, v in (("contexts", contexts), ("context_tokens", context_tokens)) if v is not None}
    if target == "lookahead":
        result = calibrate_lookahead(model, corpus, replace(CalibrationSettings(horizon=horizon, rollouts=rollouts,
                                                                                seed=seed), **sizes),
                                     show_progress=show_progress)
    else:
        sizes.update({k: v for k, v in (("new_tokens", new_tokens), ("passes", passes),
                                        ("target_contexts", target_contexts)) if v is not None})
        s = replace(ClosedLoopSettings(horizon=horizon, rollouts=rollouts, seed=seed), **sizes)
        result = _entce(model, corpus, s, show_progress)
    result.update(target=target, corpus=corpus.describe(), model_sha256=model.manifest.model_sha256,
                  created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), format=FORMAT)
    if write:
        write_json_atomic(Path(model.model_dir) / CALIBRATION_NAME, result)
    return result


def _entce(model: CausalLM, corpus: Any, s: ClosedLoopSettings, show_progress: bool | None) -> dict[str, Any]:
    contexts, target = human_log_loss(model, corpus, s, show_progress)
    epic = fit_knob(model, contexts, target, "alpha", s, show_progress)
    temp = fit_knob(model, contexts, target, "temperature", s, show_progress)
    return {
        "alpha": epic["alpha"], "alpha_se": epic["alpha_se"], "alpha_clipped": epic["clipped"],
        "temperature": temp["temperature"], "temperature_se": temp["temperature_se"],
        "human_log_loss": round(target, 6), "epic_last_pass_surprisal": epic["last_pass_surprisal"],
        "temperature_last_pass_surprisal": temp["last_pass_surprisal"],
        "alpha_trace": epic["trace"], "temperature_trace": temp["trace"],
        "horizon": s.horizon, "rollouts": s.rollouts, "contexts": s.contexts, "context_tokens": s.context_tokens,
        "new_tokens": s.new_tokens, "passes": s.passes, "target_contexts": s.target_contexts, "seed": s.seed,
    }
