"""Closed-loop calibration: fit alpha (or a temperature) so that the model's OWN generations surprise
it as much as human text does, the target of the entropy-calibration error (EntCE).

The one-step calibration (calibrate.py) matches lookahead entropies at real-text contexts; it cannot
see how a sampler's generations drift once they continue from their own tokens (Cao, Valiant & Liang
2025: errors accumulate along a generation). Here the sampler generates from calibration contexts
and a Robbins-Monro controller moves the knob after every step by the gap between the mean surprisal
−log q of the tokens just sampled and the base model's log loss on the human continuations of the
same contexts:

    theta <- theta + sign * gain * (mean surprisal_k - human log loss)

(alpha up, or temperature down, when the generations are more surprising than human text). How much
surprisal a unit of alpha buys differs by an order of magnitude between models, so no fixed gain
fits all: the gain follows Kesten's rule, halving whenever the smoothed gap changes sign (the iterate
crossed the root), so it moves fast while far off and settles once it oscillates around the root.
Every pass runs all contexts for `new_tokens` steps with fresh random streams; the estimate is the
average of the iterates over the last pass (Polyak-Ruppert averaging), its standard error from batch
means of those iterates. Deterministic for a seed: the rows' random streams and the update order
are fixed.

The defaults (32 passages, 64 new tokens, the target on the same passages) are the settings that
generalized best to held-out novels on EntCE, measured against longer fits (docs/calibration-comparison/):
the drift grows along a generation (the surprisal gap rises from about -0.2 nats over the first 16
tokens to +0.15..+0.35 over tokens 128-256), so 16 x 256-token generations with the target pooled over
128 passages (`new_tokens=256, contexts=16, target_contexts=128`) see more of it and double alpha, but
the excerpts' log loss is 0.17-0.27 nats below the held-out novels', and that fit overshoots there
(EntCE -0.18 / -0.28 / -0.31 on Emma, Persuasion, Emma x 512 against +0.08 / +0.07 / +0.07), while it
closes the entropy gap (+0.05 against +0.29 on Emma). The level a fit reaches belongs to the text it is
fitted on: calibrate on text like the text to be generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..chooser import PlainChooser, Row, StepResult
from ..decoding import generate
from ..epic.chooser import EpicChooser
from ..scoring import pooled_mean, score_continuations
from ..progress import progress
from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from ..sampling.kernels import log_softmax
from ..settings import GenerationConfig
from .corpus import Corpus, context_at, sample_positions

KNOBS = ("alpha", "temperature")


@dataclass(frozen=True)
class ClosedLoopSettings:
    contexts: int = 32
    context_tokens: int = 128
    new_tokens: int = 64
    passes: int = 2
    target_contexts: int = 32  # human continuations scored for the target (the generated contexts among them)
    batch_size: int = 32
    horizon: int = 4
    rollouts: int = 2
    seed: int = 0
    # starting gains, in knob units per nat of surprisal gap; Kesten's rule halves them at each crossing.
    # A step moves the knob by at most max_step: a swing to a large alpha would make EPIC's rounds wide
    # (its cost grows fast with alpha) long before the gain could settle.
    alpha_gain: float = 0.5
    temperature_gain: float = 0.5
    alpha_max_step: float = 0.02
    temperature_max_step: float = 0.05  # of log T
    smoothing: float = 0.9  # EMA weight of the past in the gap whose sign changes halve the gain


@dataclass
class Controller:
    """The stochastic-approximation iterate of one knob (alpha, or log temperature)."""

    theta: float
    gain: float
    sign: float  # +1: a larger theta makes the generations less surprising (alpha); -1: more (temperature)
    low: float
    high: float
    smoothing: float = 0.7
    max_step: float = float("inf")
    smoothed: float | None = None  # EMA of the gap
    trace: list[float] = field(default_factory=list)  # theta before each step
    min_gain_share: float = 1 / 16

    def update(self, gap: float) -> None:
        self.trace.append(self.theta)
        before = self.smoothed
        self.smoothed = gap if before is None else self.smoothing * before + (1 - self.smoothing) * gap
        if before is not None and np.sign(self.smoothed) != np.sign(before):
            self.gain = max(self.gain / 2, self.min_gain_share * self._gain0)
        step = float(np.clip(self.sign * self.gain * gap, -self.max_step, self.max_step))
        self.theta = float(np.clip(self.theta + step, self.low, self.high))

    def __post_init__(self) -> None:
        self._gain0 = self.gain


class SteeredChooser:
    """A chooser whose knob the controller moves between steps: EPIC at the current alpha, or plain
    sampling at the current temperature. It reports each step's mean surprisal of the sampled tokens
    under the base model (raw logits) to the controller."""

    def __init__(self, knob: str, controller: Controller, target: float, horizon: int, rollouts: int,
                 bar: Any = None):
        self.knob, self.controller, self.target, self.bar = knob, controller, target, bar
        self.horizon, self.rollouts = horizon, rollouts
        self.scratch_positions = EpicChooser(1.0, horizon, rollouts).scratch_positions if knob == "alpha" else 0

    def choose(self, model: CausalLM, rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray,
               cache: KVCache) -> StepResult:
        theta = self.controller.theta
        if self.knob == "alpha":
            chooser = EpicChooser(theta, self.horizon, self.rollouts, run_ahead=False)
            result = chooser.choose(model, rows, logits, scores, cache)
        else:
            temperature = math.exp(theta)
            result = PlainChooser().choose(model, rows, logits, scores / np.float32(temperature), cache)
        logq = log_softmax(logits)
        surprisal = -logq[np.arange(len(rows)), result.tokens].astype(np.float64)
        self.controller.update(float(surprisal.mean()) - self.target)
        if self.bar is not None:
            value = self.controller.theta if self.knob == "alpha" else math.exp(self.controller.theta)
            self.bar.set_postfix_str(f"{self.knob}={value:.4f} gap={self.controller.smoothed:+.3f}", refresh=False)
        return result


def human_log_loss(model: CausalLM, corpus: Corpus, s: ClosedLoopSettings, show_progress: bool | None = None
                   ) -> tuple[list[list[int]], float]:
    """The contexts to generate from (`contexts` of them, spread evenly over the text) and the base
    model's log loss on the human continuations of `target_contexts` passages, those included."""
    n = max(s.contexts, s.target_contexts)
    positions = sample_positions(corpus, n, s.context_tokens, s.new_tokens, s.seed)
    contexts = [context_at(corpus, int(p), s.context_tokens) for p in positions]
    human = [corpus.tokens[int(p): int(p) + s.new_tokens].tolist() for p in positions]
    bar = progress(total=n * s.new_tokens, desc="calibrating: human log loss", unit="tok", enable=show_progress)
    scored = []
    with bar:
        for lo in range(0, n, 16):
            scored += score_continuations(model, contexts[lo:lo + 16], human[lo:lo + 16], batch_size=8)
            bar.update(len(human[lo:lo + 16]) * s.new_tokens)
    chosen = np.linspace(0, n - 1, s.contexts).round().astype(int)
    return [contexts[i] for i in chosen], pooled_mean([nll for _, nll in scored])


def fit_knob(model: CausalLM, contexts: list[list[int]], target: float, knob: str, s: ClosedLoopSettings,
             show_progress: bool | None = None) -> dict[str, Any]:
    """Steer `knob` over the passes; its Polyak average over the last pass and what that pass measured."""
    if knob not in KNOBS:
        raise ValueError(f"knob must be one of {KNOBS}")
    if knob == "alpha":
        controller = Controller(0.0, s.alpha_gain, +1.0, -2.0, 2.0, s.smoothing, s.alpha_max_step)
    else:
        controller = Controller(0.0, s.temperature_gain, -1.0, math.log(0.2), math.log(5.0), s.smoothing,
                                s.temperature_max_step)
    bar = progress(total=s.passes * len(contexts) * s.new_tokens, desc=f"calibrating {knob} (EntCE)", unit="tok",
                   enable=show_progress)
    chooser = SteeredChooser(knob, controller, target, s.horizon, s.rollouts, bar)
    last: list[Any] = []
    try:
        for p in range(s.passes):
            start = len(controller.trace)
            config = GenerationConfig(max_new_tokens=s.new_tokens, seed=s.seed * 1000 + p + 1)
            last = list(generate(model, prompt_ids=contexts, config=config, batch_size=s.batch_size, chooser=chooser,
                                 on_step=bar.update))
    finally:
        bar.close()
    tail = np.asarray(controller.trace[start:] + [controller.theta])
    estimate = float(tail.mean())
    blocks = [b.mean() for b in np.array_split(tail, 4) if b.size]
    se = float(np.std(blocks, ddof=1) / math.sqrt(len(blocks))) if len(blocks) > 1 else float("nan")
    gen = score_continuations(model, [contexts[x.prompt_index] for x in last], [x.token_ids for x in last], 8)
    value = estimate if knob == "alpha" else math.exp(estimate)
    return {knob: round(value, 6), f"{knob}_se": round(se if knob == "alpha" else value * se, 6),
            "last_pass_surprisal": round(pooled_mean([nll for _, nll in gen]), 6),
            "trace": [round(t if knob == "alpha" else math.exp(t), 5) for t in controller.trace[::4]],
            "clipped": bool(np.isclose(estimate, controller.low) or np.isclose(estimate, controller.high))}
