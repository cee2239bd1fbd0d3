"""Truncation samplers beyond transformers' classic four: ε- and η-sampling, and top-nσ.

`EpsilonProcessor` and `EtaProcessor` reproduce transformers 4.57's `EpsilonLogitsWarper` and
`EtaLogitsWarper` decision for decision (float32 probabilities and thresholds, as the ports in
`processors.py` do), so that `evaluate` can compare them with the same cut-offs people use in
`transformers.generate`. `TopNSigmaProcessor` follows llama.cpp's `top_n_sigma` sampler (transformers
has none). The conventions of `processors.py` hold: a new array of the same shape and dtype, removed
tokens at -inf, `-inf` input entries mean "already banned", an all-`-inf` row comes back unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import _float_dtype, entropy, softmax64
from .processors import LogitsProcessor, _as_scores, _check_min_tokens, _check_real, _filtered

__all__ = ["EpsilonProcessor", "EtaProcessor", "TopNSigmaProcessor"]


def _check_cutoff(name: str, value: float) -> float:
    """A cut-off in [0, 1): transformers wants (0, 1); 0 is accepted here and means "off", which is
    what `generate` does with 0 (it skips the warper)."""
    v = _check_real(name, value)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"{name} has to be in [0, 1), but is {value}")
    return v


def _protected(scores: np.ndarray, min_tokens_to_keep: int) -> np.ndarray:
    """Tokens a cut must spare: every logit >= the `min_tokens_to_keep`-th largest (transformers'
    `scores < topk(scores, k)[0][..., -1]` test, so all ties with that value are spared too)."""
    v = scores.shape[-1]
    k = min(min_tokens_to_keep, v)
    kth = np.partition(scores, v - k, axis=-1)[..., v - k : v - k + 1]
    return scores >= kth


def _cut_below(scores: np.ndarray, probs: np.ndarray, threshold: np.ndarray, min_tokens_to_keep: int) -> np.ndarray:
    """`scores` with the tokens whose probability is < threshold removed, sparing the protected ones."""
    remove = (probs < threshold) & ~_protected(scores, min_tokens_to_keep)
    return _filtered(scores, remove)


class EpsilonProcessor(LogitsProcessor):
    """ε-sampling (transformers' `EpsilonLogitsWarper`): remove every token whose probability is
    below `epsilon`, an absolute floor that cuts the long tail of near-zero tokens whatever the
    context (Hewitt et al., 2022, "Truncation Sampling as Language Model Desmoothing").

    The `min_tokens_to_keep` most likely tokens are spared (with every token tied with the last of
    them), as in transformers. Probabilities are float32 and compared with `float32(epsilon)`, as torch
    does. `epsilon == 0` keeps everything.
    """

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1) -> None:
        self.epsilon = _check_cutoff("epsilon", epsilon)
        self.min_tokens_to_keep = _check_min_tokens(min_tokens_to_keep)

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        if self.epsilon == 0.0 or scores.shape[-1] == 0:
            return scores.copy()
        dt = _float_dtype(scores)
        probs = softmax64(scores).astype(dt)
        return _cut_below(scores, probs, dt.type(self.epsilon), self.min_tokens_to_keep)

    def __repr__(self) -> str:
        return f"EpsilonProcessor(epsilon={self.epsilon}, min_tokens_to_keep={self.min_tokens_to_keep})"


class EtaProcessor(LogitsProcessor):
    """η-sampling (transformers' `EtaLogitsWarper`): remove tokens below
    `min(eta, sqrt(eta) * exp(-H))`, H the row's entropy in nats. Unlike ε's fixed floor, the cut
    drops when the model is unsure (high H), so flat distributions keep their many plausible tokens
    while peaked ones lose their tail (Hewitt et al., 2022).

    As in transformers, the entropy, `sqrt(eta)`, the exponential and the minimum are float32 (the
    entropy is computed in float64 and rounded), the probabilities float32, and the
    `min_tokens_to_keep` most likely tokens are spared. `eta == 0` keeps everything. transformers
    raises on a row that is entirely -inf (its Categorical gets NaN); here it comes back unchanged.
    """

    def __init__(self, eta: float, min_tokens_to_keep: int = 1) -> None:
        self.eta = _check_cutoff("eta", eta)
        self.min_tokens_to_keep = _check_min_tokens(min_tokens_to_keep)

    def threshold(self, scores: np.ndarray) -> np.ndarray:
        """The per-row cut `min(eta, sqrt(eta) * exp(-H))`, float32 like torch's, shape [..., 1]."""
        dt = _float_dtype(scores)
        eta = dt.type(self.eta)
        h = entropy(scores).astype(dt)[..., None]
        return np.minimum(eta, np.sqrt(eta) * np.exp(-h))

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        if self.eta == 0.0 or scores.shape[-1] == 0:
            return scores.copy()
        probs = softmax64(scores).astype(_float_dtype(scores))
        return _cut_below(scores, probs, self.threshold(scores), self.min_tokens_to_keep)

    def __repr__(self) -> str:
        return f"EtaProcessor(eta={self.eta}, min_tokens_to_keep={self.min_tokens_to_keep})"


class TopNSigmaProcessor(LogitsProcessor):
    """Top-nσ (llama.cpp's `top_n_sigma` sampler; Tang et al., 2024, "Top-nσ: Not All Logits Are You
    Need"): keep the logits `>= max - n * σ`, σ the standard deviation of the row's logits.

    It works on logits, not probabilities: the informative tokens stand out of a roughly Gaussian
    noise floor, and dividing by a temperature scales max and σ alike, so the kept set does not
    depend on the temperature (high temperatures stay coherent). As in llama.cpp, `-inf` logits
    (already banned) are left out of the mean and σ (population σ, divided by the count), the most
    likely token is always kept, and `n == 0` disables the filter (llama.cpp treats any `n <= 0` as
    off, its default being -1; negative values are refused here, like the setting's range). The
    statistics are float64 here (llama.cpp sums in float32), so a logit within rounding of the cut
    can fall the other way.
    """

    def __init__(self, n: float) -> None:
        n = _check_real("n", n)
        if not (0.0 <= n < math.inf):
            raise ValueError(f"top_n_sigma has to be a finite number >= 0, but is {n}")
        self.n = n

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        if self.n == 0.0 or scores.shape[-1] <= 1:
            return scores.copy()
        x = np.asarray(scores, dtype=np.float64)
        valid = ~np.isneginf(x)
        count = np.maximum(np.sum(valid, axis=-1, keepdims=True), 1)
        finite = np.where(valid, x, 0.0)
        mean = np.sum(finite, axis=-1, keepdims=True) / count
        sigma = np.sqrt(np.sum(np.where(valid, (finite - mean) ** 2, 0.0), axis=-1, keepdims=True) / count)
        top = np.max(x, axis=-1, keepdims=True)  # -inf for an all -inf row: nothing is below its cut
        return _filtered(scores, x < top - self.n * sigma)

    def __repr__(self) -> str:
        return f"TopNSigmaProcessor(n={self.n})"
