"""Mirostat v2 (Basu et al., 2021), as llama.cpp's `llama_sampler_mirostat_v2` runs it: the arithmetic
of one step for a batch of rows, each with its own controller state `mu`.

Mirostat holds the surprise of the text (bits per token) near a target `tau` instead of fixing a
truncation: each step it drops the tokens whose surprise `-log2 p` exceeds `mu`, samples from the
renormalized rest, and moves `mu` against the error, `mu -= eta * (observed - tau)`, where the
observed surprise is the sampled token's under the renormalized truncated distribution. Too
surprising a token lowers `mu` (tighter next step), too predictable a one raises it. `mu` starts at
`2 * tau`. The state lives with each sample (`chooser.MirostatChooser` keeps it on the row), so this
module is only the vectorized step.

Float32 throughout, as llama.cpp's floats: the probabilities, their log2, `mu` and its update.
llama.cpp keeps the prefix of the descending-sorted candidates up to the first one above `mu`;
probabilities are monotone in the logits, so that is the mask `surprise <= mu` here. When no token
passes, llama.cpp keeps the first of its sort; here the most likely token with the lowest id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import draws_from_scores, softmax64

__all__ = ["MirostatStep", "initial_mu", "mirostat_v2_step", "truncate"]

_F32 = np.float32


def initial_mu(tau: float) -> float:
    """`mu` before the first step: twice the target, as llama.cpp starts it (`2.0f * tau`)."""
    return float(_F32(2.0) * _F32(tau))


def _surprise(scores: np.ndarray) -> np.ndarray:
    """-log2 of the float32 softmax, float32 (banned tokens: +inf)."""
    p = softmax64(scores).astype(_F32)
    with np.errstate(divide="ignore"):
        return -np.log2(p)


def truncate(scores: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """`scores` [rows, vocab] with every token whose surprise exceeds its row's `mu` [rows] at -inf;
    a row where none passes keeps its most likely token (the lowest id among equals)."""
    scores = np.asarray(scores)
    keep = _surprise(scores) <= np.asarray(mu, dtype=_F32)[:, None]
    empty = ~keep.any(axis=-1)
    if empty.any():
        keep[np.flatnonzero(empty), np.argmax(scores[empty], axis=-1)] = True
    return np.where(keep, scores, np.asarray(-np.inf, dtype=scores.dtype))


@dataclass
class MirostatStep:
    """One step's outcome for a batch: the tokens, each row's observed surprise (bits) and new `mu`."""

    tokens: np.ndarray
    surprise: np.ndarray
    mu: np.ndarray


def mirostat_v2_step(scores: np.ndarray, mu: np.ndarray, u: np.ndarray, tau: float, eta: float) -> MirostatStep:
    """Truncate each row at its `mu`, draw one token per row by inverse CDF with its uniform `u`
    (the same draw as plain sampling, on the truncated scores), and update `mu`."""
    truncated = truncate(scores, mu)
    tokens = draws_from_scores(truncated, np.asarray(u, dtype=np.float64).reshape(-1, 1))[:, 0]
    rows = np.arange(len(tokens))
    observed = _surprise(truncated)[rows, tokens]
    new_mu = np.asarray(mu, dtype=_F32) - _F32(eta) * (observed - _F32(tau))
    return MirostatStep(tokens.astype(np.int64), observed, new_mu.astype(_F32))
