"""How a decode loop and a token chooser talk: the rows, one step's answer, and the chooser protocol.

These types sit below both the decode loop (`decoding.py`, later a serving scheduler) and the
choosers (`PlainChooser` and `MirostatChooser` here, EPIC's in `epic/`), so neither imports the
other. The loop owns the rows and the cache; each step it hands the chooser the rows still running,
their logits, the processed scores and the cache, and gets back one token per row. Rows may join and leave between
steps: whatever a chooser remembers about a row lives on the row (`Row.chooser_state`), not in the
chooser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from .sampling.mirostat import initial_mu, mirostat_v2_step
from .sampling.sample import greedy, sample_categorical

if TYPE_CHECKING:
    from .runtime.cache import KVCache
    from .runtime.model import CausalLM


@dataclass
class Row:
    """One sample being decoded: its prompt, its own random stream, what it has generated."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    chooser_state: Any = None  # what the chooser keeps about this row between steps


@dataclass
class StepResult:
    """A chooser's answer for the rows it was given: a token each and, when it already ran the model
    on them (EPIC's lookahead), the logits and cache that follow, so the loop skips its own step."""

    tokens: np.ndarray
    next_logits: np.ndarray | None = None
    next_cache: "KVCache | None" = None
    row_stats: list[dict[str, int]] | None = None


class TokenChooser(Protocol):
    """Picks each row's next token.

    `scratch_positions`: cache positions per row the chooser runs after the cache for its own work
    (EPIC's token trees); the loop sizes the cache for prompt + new tokens + that, so the cache does
    not have to grow mid-generation. 0 for choosers that do not run the model."""

    scratch_positions: int

    def choose(self, model: "CausalLM", rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray,
               cache: "KVCache") -> StepResult: ...


class PlainChooser:
    """One draw per row from its processed scores (inverse CDF on the row's stream), or the argmax."""

    scratch_positions = 0

    def __init__(self, greedy_decoding: bool = False):
        self.greedy = greedy_decoding

    def choose(self, model: "CausalLM", rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray,
               cache: "KVCache") -> StepResult:
        if self.greedy:
            return StepResult(greedy(scores))
        return StepResult(sample_categorical(scores, [r.rng for r in rows]))


@dataclass
class MirostatState:
    """What mirostat remembers about one sample: its controller's truncation level `mu` (bits)."""

    mu: float


class MirostatChooser:
    """Mirostat v2 (`sampling/mirostat.py`): each row truncates its processed scores at its own `mu`,
    draws one token with one uniform from its own stream (as `PlainChooser` does, so a sample's
    tokens do not depend on its batch), and updates `mu` toward the target surprise `tau`."""

    scratch_positions = 0

    def __init__(self, tau: float, eta: float):
        if not (tau > 0 and eta > 0):
            raise ValueError(f"mirostat needs tau > 0 and eta > 0, not tau={tau}, eta={eta}")
        self.tau = float(tau)
        self.eta = float(eta)

    def _state(self, row: Row) -> MirostatState:
        if not isinstance(row.chooser_state, MirostatState):
            row.chooser_state = MirostatState(initial_mu(self.tau))
        return row.chooser_state

    def choose(self, model: "CausalLM", rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray,
               cache: "KVCache") -> StepResult:
        states = [self._state(r) for r in rows]
        u = np.array([r.rng.random() for r in rows], dtype=np.float64)
        step = mirostat_v2_step(scores, np.array([s.mu for s in states]), u, self.tau, self.eta)
        for state, mu in zip(states, step.mu.tolist()):
            state.mu = mu
        return StepResult(step.tokens)
