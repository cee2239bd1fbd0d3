"""Drawing tokens from processed logits with one random stream per sample.

Each sample owns a `numpy.random.Generator` seeded from (seed, prompt index, sample index), so a
sample's tokens do not depend on the batch it happened to share. Plain sampling uses inverse-CDF
draws (one uniform per row, the rest vectorized over the batch); EPIC uses Gumbel-max because its
lazy search needs a per-token perturbation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .kernels import draws_from_scores


def sample_rng(seed: int, prompt_index: int, sample_index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(prompt_index), int(sample_index)])


def greedy(scores: np.ndarray) -> np.ndarray:
    """argmax per row; ties go to the lowest id, as in torch.argmax."""
    return np.argmax(scores, axis=-1).astype(np.int64)


def sample_categorical(scores: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One draw per row from softmax(scores) by inverse CDF: one uniform from each row's stream.
    The draw is `processors.draws_from_scores` (float32 weights, float64 running sums over blocks
    of tokens, as EPIC's rollouts draw), which equals `inverse_cdf(kernels.softmax64(scores), u)` up to a u on a rounding
    boundary, at a quarter of the time: at batch 8 the float64 softmax and cumsum were ~10% of a
    decoding step."""
    u = np.array([rng.random() for rng in rngs], dtype=np.float64)
    return draws_from_scores(scores, u[:, None])[:, 0]


def inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row i gets the first token whose cumulative probability exceeds u[i] (u in [0, 1)),
    vectorized over rows; rounding at the top end never lands on a zero-probability token.
    The float64 reference the faster draws are tested against."""
    cdf = np.cumsum(probs, axis=-1)
    idx = (cdf <= (np.asarray(u, dtype=np.float64) * cdf[:, -1])[:, None]).sum(axis=-1)
    idx = np.minimum(idx, probs.shape[-1] - 1)
    bad = probs[np.arange(len(idx)), idx] == 0
    if bad.any():
        idx[bad] = np.argmax(probs[bad], axis=-1)
    return idx.astype(np.int64)


def gumbel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Standard Gumbel noise, float64: g = -log(-log(U)), U in (0, 1)."""
    u = rng.random(size)
    u = np.maximum(u, np.finfo(np.float64).tiny)
    return -np.log(-np.log(u))
