"""NumPy ports of the Hugging Face logits warpers used as sampling baselines.

The engine runs on ONNX Runtime and must not depend on torch, but its sampling baselines have to be
comparable with `transformers.generate`. Each class here reproduces the corresponding
`transformers` 4.57 warper (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`,
`MinPLogitsWarper`, `TypicalLogitsWarper`) decision for decision, including the float32 rounding
of the probabilities and thresholds that decide which tokens are cut, so that the same logits keep
the same tokens in both. The tests in `tests/test_processors.py` check this against transformers.

Conventions shared by every processor:

* `scores` is a float array `[..., vocab]` of logits (normally `[batch, vocab]` float32); the
  vocabulary is the last axis. `-inf` entries are allowed and mean "already banned". `+inf` and NaN
  are not supported.
* A processor returns a new array of the same shape and dtype; the input is never written to.
  Filtered tokens are set to `-inf` (transformers' default `filter_value`).
* A row that is entirely `-inf` comes back unchanged (no exception, no NaN).
* Ties. `torch.sort` is not stable on CPU, so which of several equal logits transformers drops at
  a cut-off depends on the sort's internals. Here ties are broken deterministically: among equal
  logits the lowest token id is kept first, the same rule as `argmax` (and
  `epic_ort.sampling.sample.greedy`). The number of kept tokens with each value is the same as in
  transformers; only the choice among equal logits at the cut can differ.

Each processor is one small object with `apply(scores, history)`; `ProcessorList` composes them in
order. Which processors a configuration gets, and in which order, is declared once, in
`epic_ort.settings.GenerationConfig` (the field of each setting names its processor).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .kernels import _float_dtype, log_softmax64, softmax64

__all__ = [
    "LogitsProcessor",
    "TemperatureProcessor",
    "TopKProcessor",
    "TopPProcessor",
    "MinPProcessor",
    "TypicalProcessor",
    "ProcessorList",
]

_NEG_INF = -np.inf


# ---------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------


def _as_scores(scores: np.ndarray) -> np.ndarray:
    """View the input as a float array without copying it (processors never write to it)."""
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32)
    if scores.ndim == 0:
        raise ValueError("scores must have at least one dimension (the vocabulary)")
    return scores


def _check_min_tokens(min_tokens_to_keep: int) -> int:
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, numbers.Integral):
        raise ValueError(f"min_tokens_to_keep has to be a positive integer, but is {min_tokens_to_keep!r}")
    if min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep has to be a positive integer, but is {min_tokens_to_keep}")
    return int(min_tokens_to_keep)


def _check_real(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} has to be a real number, but is {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _filtered(scores: np.ndarray, remove: np.ndarray) -> np.ndarray:
    """A new array equal to `scores` with the `remove` positions set to -inf (`masked_fill`)."""
    return np.where(remove, np.asarray(_NEG_INF, dtype=scores.dtype), scores)


def _descending_order(x: np.ndarray) -> np.ndarray:
    """argsort by decreasing logit; equal logits in increasing token id (lowest id kept first)."""
    return np.argsort(-x, axis=-1, kind="stable")


# ---------------------------------------------------------------------------------------------
# processors
# ---------------------------------------------------------------------------------------------


class LogitsProcessor:
    """One transformation of a batch of logits. `history` [rows, t] holds each row's generated
    tokens (None: none yet), for processors that look at them."""

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """transformers' calling convention, (input_ids, scores)."""
        return self.apply(scores, input_ids)


class TemperatureProcessor(LogitsProcessor):
    """Divide the logits by `temperature` (transformers' `TemperatureLogitsWarper`).

    `temperature` must be a finite number > 0: 0 would be greedy decoding, which callers must
    request explicitly rather than through a division by zero. Unlike transformers, an int such as
    `2` is accepted (transformers insists on a Python float).
    """

    def __init__(self, temperature: float) -> None:
        t = _check_real("temperature", temperature)
        if not (t > 0) or not math.isfinite(t):
            raise ValueError(f"temperature has to be a strictly positive finite float, but is {temperature}")
        self.temperature = t

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        # torch divides a float32 tensor by the scalar in float32; do the same.
        return scores / np.asarray(self.temperature, dtype=scores.dtype)

    def __repr__(self) -> str:
        return f"TemperatureProcessor(temperature={self.temperature})"


class TopKProcessor(LogitsProcessor):
    """Keep the `max(top_k, min_tokens_to_keep)` highest logits (transformers' `TopKLogitsWarper`).

    Ties with the k-th largest logit are all kept (the test is `score < kth_value`), so a row can
    keep more than k tokens. `top_k == 0` disables the filter (transformers rejects 0; its
    `generate` simply skips the warper). If the k-th value is `-inf`, nothing is removed.
    """

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise ValueError(f"top_k has to be a non-negative integer, but is {top_k!r}")
        self.min_tokens_to_keep = _check_min_tokens(min_tokens_to_keep)
        self.top_k = 0 if top_k == 0 else max(int(top_k), self.min_tokens_to_keep)

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        v = scores.shape[-1]
        if self.top_k == 0 or v == 0:
            return scores.copy()
        k = min(self.top_k, v)
        # np.partition puts the k-th largest value at position v - k (an O(V) selection, no sort).
        kth = np.partition(scores, v - k, axis=-1)[..., v - k : v - k + 1]
        return _filtered(scores, scores < kth)

    def __repr__(self) -> str:
        return f"TopKProcessor(top_k={self.top_k}, min_tokens_to_keep={self.min_tokens_to_keep})"


class TopPProcessor(LogitsProcessor):
    """Nucleus filtering (transformers' `TopPLogitsWarper`).

    transformers sorts *ascending*, takes the float32 cumulative probability from the least likely
    token up, and removes every token whose cumulative probability is `<= 1 - top_p`; the
    `min_tokens_to_keep` most likely tokens are always kept. The effect is to keep the smallest set
    of most likely tokens whose mass is `>= top_p`. Two consequences of that convention are kept
    here on purpose:

    * with `top_p == 1.0` the processor is *not* an identity: tokens whose float32 probability
      underflows to 0 have cumulative probability 0 `<= 0` and are removed
      (`GenerationConfig.processors` skips `top_p == 1.0`, as `generate` does);
    * the cumulative sum is done in float64 and rounded to float32, as torch's CPU `cumsum` does,
      and compared with `float32(1 - top_p)` (float64 throughout for float64 logits).

    Requires `0 < top_p <= 1` (transformers also accepts 0, which keeps only `min_tokens_to_keep`).
    """

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1) -> None:
        p = _check_real("top_p", top_p)
        if not (0.0 < p <= 1.0):
            raise ValueError(f"top_p has to be in (0, 1], but is {top_p}")
        self.top_p = p
        self.min_tokens_to_keep = _check_min_tokens(min_tokens_to_keep)

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        if scores.shape[-1] == 0:
            return scores.copy()
        v = scores.shape[-1]
        # Only values are sorted (np.sort is ~20x faster than a stable argsort on a 49k vocab).
        # cumulative is non-decreasing, so the removed tokens are a prefix of the ascending order;
        # what is kept is every logit above the smallest kept value `cut` plus as many of the
        # logits equal to `cut` as the prefix spared, taken lowest token id first.
        sorted_logits = np.sort(scores, axis=-1)
        dt = _float_dtype(scores)  # float32 like torch for float32 logits
        probs = softmax64(sorted_logits).astype(dt)
        cumulative = np.cumsum(probs, axis=-1, dtype=np.float64).astype(dt)
        n_remove = np.sum(cumulative <= dt.type(1.0 - self.top_p), axis=-1, keepdims=True)
        n_remove = np.minimum(n_remove, max(v - self.min_tokens_to_keep, 0))
        cut = np.take_along_axis(sorted_logits, n_remove, axis=-1)
        removed_equal = np.sum((sorted_logits == cut) & (np.arange(v) < n_remove), axis=-1, keepdims=True)
        remove = scores < cut
        split = removed_equal[..., 0] > 0  # rows whose cut falls inside a block of equal logits
        if np.any(split):
            sub_scores, sub_cut = scores[split], cut[split]
            equal = sub_scores == sub_cut
            rank = np.cumsum(equal, axis=-1)  # 1-based rank among the tied logits, by token id
            n_equal_kept = np.sum(equal, axis=-1, keepdims=True) - removed_equal[split]
            remove[split] = (sub_scores < sub_cut) | (equal & (rank > n_equal_kept))
        return _filtered(scores, remove)

    def __repr__(self) -> str:
        return f"TopPProcessor(top_p={self.top_p}, min_tokens_to_keep={self.min_tokens_to_keep})"


class MinPProcessor(LogitsProcessor):
    """Min-p filtering (transformers' `MinPLogitsWarper`).

    A token is removed when its probability is below `min_p * max_probability` of its row, so the
    cut scales with how confident the model is. Probabilities and the threshold are float32, as in
    transformers. The `min_tokens_to_keep` most likely tokens are always kept. `min_p == 0` keeps
    everything; `min_p == 1` keeps only the tokens tied with the maximum.
    """

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1) -> None:
        p = _check_real("min_p", min_p)
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"min_p has to be in [0, 1], but is {min_p}")
        self.min_p = p
        self.min_tokens_to_keep = _check_min_tokens(min_tokens_to_keep)

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        if scores.shape[-1] == 0:
            return scores.copy()
        dt = _float_dtype(scores)  # float32 like torch for float32 logits
        probs = softmax64(scores).astype(dt)
        threshold = dt.type(self.min_p) * np.max(probs, axis=-1, keepdims=True)
        remove = probs < threshold
        if self.min_tokens_to_keep > 1:
            # Probability is monotone in the logit, so if a row already keeps >= min_tokens_to_keep
            # tokens, its top min_tokens_to_keep are among them; only short rows need the sort.
            short = np.sum(~remove, axis=-1) < self.min_tokens_to_keep
            if np.any(short):
                sub = remove[short]
                top = _descending_order(scores[short])[..., : self.min_tokens_to_keep]
                np.put_along_axis(sub, top, False, axis=-1)
                remove[short] = sub
        return _filtered(scores, remove)

    def __repr__(self) -> str:
        return f"MinPProcessor(min_p={self.min_p}, min_tokens_to_keep={self.min_tokens_to_keep})"


class TypicalProcessor(LogitsProcessor):
    """Locally typical sampling (transformers' `TypicalLogitsWarper`).

    Tokens are ranked by how far their surprisal `-log p` lies from the row's entropy
    (`|-log p - H|`, ascending); the kept set is the shortest prefix of that ranking whose
    probability mass reaches `mass`, extended to every token tied with the last one, plus the first
    `min_tokens_to_keep` of the ranking. As in transformers, the most likely token can be removed.

    transformers only accepts `0 < mass < 1`; here `mass == 1.0` is accepted and means "keep
    everything" (identity), which is what `typical_p = 1.0` means in `generate` (it skips the
    warper).
    """

    def __init__(self, mass: float, min_tokens_to_keep: int = 1) -> None:
        m = _check_real("mass", mass)
        if not (0.0 < m <= 1.0):
            raise ValueError(f"typical mass has to be in (0, 1], but is {mass}")
        self.mass = m
        self.min_tokens_to_keep = _check_min_tokens(min_tokens_to_keep)

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        scores = _as_scores(scores)
        v = scores.shape[-1]
        if self.mass >= 1.0 or v == 0:
            return scores.copy()
        logp = log_softmax64(scores)
        p = np.exp(logp)
        ent = -np.sum(np.where(p > 0, logp, 0.0) * p, axis=-1, keepdims=True)
        shifted = np.abs(-logp - ent)  # -inf logits give +inf: ranked last, never a threshold
        # Any sort order works for the threshold: tokens with equal `shifted` form one block, the
        # threshold is a value of `shifted`, and wherever the mass crosses `mass` inside a block
        # it picks that block's value. So use the fast unstable argsort here.
        order = np.argsort(shifted, axis=-1)
        sorted_shifted = np.take_along_axis(shifted, order, axis=-1)
        dt = _float_dtype(scores)  # float32 like torch for float32 logits
        sorted_probs = np.take_along_axis(p, order, axis=-1).astype(dt)
        cumulative = np.cumsum(sorted_probs, axis=-1, dtype=np.float64).astype(dt)
        last_ind = np.sum(cumulative < dt.type(self.mass), axis=-1, keepdims=True)
        last_ind = np.minimum(last_ind, v - 1)
        remove = shifted > np.take_along_axis(sorted_shifted, last_ind, axis=-1)
        if self.min_tokens_to_keep > 1:
            # The first min_tokens_to_keep of the ranking are also kept. They already are whenever
            # a row keeps that many tokens; otherwise rank the short rows again with a stable sort
            # (equal distances: lowest token id first).
            short = np.sum(~remove, axis=-1) < self.min_tokens_to_keep
            if np.any(short):
                sub = remove[short]
                first = np.argsort(shifted[short], axis=-1, kind="stable")[..., : self.min_tokens_to_keep]
                np.put_along_axis(sub, first, False, axis=-1)
                remove[short] = sub
        return _filtered(scores, remove)

    def __repr__(self) -> str:
        return f"TypicalProcessor(mass={self.mass}, min_tokens_to_keep={self.min_tokens_to_keep})"


class ProcessorList(list):
    """Processors applied in order, like transformers' `LogitsProcessorList`. Empty, `apply` hands
    the scores back as they are (no copy): callers never write to them."""

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        for processor in self:
            scores = processor.apply(scores, history)
        return scores

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return self.apply(scores, input_ids)
