"""OpenAI's presence/frequency penalties and logit_bias as a logits processor.

They are not in the settings table (offline `generate` has no use for them), so they live with the
engine, which applies them to each row's raw logits before the table's processors, with the row's
own generated tokens as history (OpenAI counts the completion's tokens, not the prompt's):

    logits[j] += bias[j] - frequency * count[j] - presence * (count[j] > 0)

EPIC's lookahead entropies use the table's processors only: the penalties shape which token is
drawn now, not the entropy of what would follow it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..sampling.processors import LogitsProcessor


class OpenAIPenalties(LogitsProcessor):
    """presence_penalty, frequency_penalty and logit_bias of one request (all neutral: not built)."""

    def __init__(self, presence: float, frequency: float, bias: Mapping[int, float], vocab_size: int):
        self.presence, self.frequency = float(presence), float(frequency)
        self.bias = np.zeros(vocab_size, dtype=np.float32)
        for token, value in bias.items():
            self.bias[int(token)] = np.float32(value)
        self.vocab_size = vocab_size

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        out = np.asarray(scores, dtype=np.float32) + self.bias
        if history is None or history.size == 0 or (self.presence == 0 and self.frequency == 0):
            return out
        for i, row in enumerate(np.asarray(history, dtype=np.int64).reshape(len(out), -1)):
            counts = np.bincount(row, minlength=self.vocab_size)[: self.vocab_size].astype(np.float32)
            out[i] -= np.float32(self.frequency) * counts + np.float32(self.presence) * (counts > 0)
        return out

    def __repr__(self) -> str:
        return f"OpenAIPenalties(presence={self.presence}, frequency={self.frequency}, bias={int((self.bias != 0).sum())})"


def build_penalties(presence: float, frequency: float, bias: Mapping[int, float] | None,
                    vocab_size: int) -> OpenAIPenalties | None:
    """The processor, or None when every value is neutral (the row then costs nothing extra)."""
    if presence == 0 and frequency == 0 and not bias:
        return None
    return OpenAIPenalties(presence, frequency, bias or {}, vocab_size)
