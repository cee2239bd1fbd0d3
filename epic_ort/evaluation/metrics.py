"""Rates for judging a decoding method against real text (used by `epic-ort evaluate`).

The question EPIC answers is whether generated text is as predictable *to the model itself* as
human text is. So every figure here comes from the BASE model's next-token distribution q (no
processors, temperature 1) along a sequence, by teacher forcing: the same yardstick for human
continuations and for every sampler's output, whatever distribution the sampler drew from.

- The entropy-calibration error (EntCE; Braverman et al. 2020, Cao, Valiant & Liang 2025): the
  entropy rate of the model's own generations, measured as their mean surprisal −log q(y_t), minus
  the model's log loss on human text. A calibrated sampler's generations surprise the model as much
  as human text does. This is the primary figure.
- The entropy-rate gap: mean entropy H(q(.|prefix)) along the generation minus along the human
  text (how uncertain the model is on each, rather than how surprised).

Both are differences of pooled per-token rates, paired by prompt (`rate_gap`). The per-token figures
come from `epic_ort.scoring` (teacher forcing).

Everything here is a pure NumPy function of per-position arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..scoring import pooled_mean


# ---------------------------------------------------------------------------------------------
# entropy rate and its calibration error
# ---------------------------------------------------------------------------------------------


def sums_and_counts(per_sample: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample totals and lengths: what pooled means and their bootstrap are computed from."""
    sums = np.array([float(np.sum(a)) for a in per_sample], dtype=np.float64)
    counts = np.array([len(a) for a in per_sample], dtype=np.float64)
    return sums, counts


def entropy_rate(per_sample: Sequence[np.ndarray]) -> float:
    """Entropy rate (nats/token) of a set of texts under the model: the pooled mean of their
    per-position entropies."""
    return pooled_mean(per_sample)


def per_sample_means(per_sample: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of each sample's array (NaN for an empty one): the per-prompt figures behind a rate."""
    return np.array([float(np.mean(a)) if len(a) else float("nan") for a in per_sample], dtype=np.float64)


def rate_gap(
    method: Sequence[np.ndarray],
    human: Sequence[np.ndarray],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """rate(method) - rate(human), signed and absolute, with a paired bootstrap interval over prompts.

    `method[i]` and `human[i]` are per-position figures of the sample and of the human continuation
    for prompt i: surprisals −log q for EntCE, entropies for the entropy-rate gap. Why paired: both come from the same prompt, and prompts differ far
    more from each other than methods do, so resampling prompts (the same indices for both) and
    recomputing both pooled rates keeps that shared variation out of the difference.

    The interval is a percentile interval of the *signed* difference d = rate(method) - rate(human),
    mapped through |.|: [min |d|, max |d|] over the interval, or [0, max] when it straddles 0.
    (A percentile interval of |d*| directly is biased away from 0 and can miss the point estimate
    when the true gap is small.) Returns {"value", "diff", "lo", "hi", "diff_lo", "diff_hi",
    "n_boot", "level"}; the bounds are None when n_boot is 0 or there are fewer than 2 prompts.
    """
    if len(method) != len(human):
        raise ValueError(f"{len(method)} method rows but {len(human)} human rows: the bootstrap is paired")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    ms, mc = sums_and_counts(method)
    hs, hc = sums_and_counts(human)
    diff = _ratio(ms.sum(), mc.sum()) - _ratio(hs.sum(), hc.sum())
    result: dict[str, Any] = {
        "value": abs(diff), "diff": diff, "lo": None, "hi": None, "diff_lo": None, "diff_hi": None,
        "n_boot": int(n_boot), "level": level,
    }
    n = len(method)
    if n_boot <= 0 or n < 2 or not np.isfinite(diff):
        return result
    idx = _resample(n, n_boot, seed, 104729)
    bounds = _percentiles(_resampled_rate(ms, mc, idx) - _resampled_rate(hs, hc, idx), level)
    if bounds is None:
        return result
    d_lo, d_hi = bounds
    if d_lo <= 0 <= d_hi:
        lo, hi = 0.0, max(-d_lo, d_hi)
    else:
        lo, hi = min(abs(d_lo), abs(d_hi)), max(abs(d_lo), abs(d_hi))
    result.update(lo=lo, hi=hi, diff_lo=d_lo, diff_hi=d_hi)
    return result


def abs_gap_difference(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    human: Sequence[np.ndarray],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """|rate(a) − rate(human)| − |rate(b) − rate(human)| with a paired bootstrap interval: whether
    method a is farther from calibrated than method b on the same passages. Two intervals of |EntCE|
    that overlap do not say the methods are alike; this difference, resampling the passages once for
    all three, does (an interval holding 0: they cannot be told apart). Returns {"diff", "lo", "hi"}."""
    if not len(a) == len(b) == len(human):
        raise ValueError(f"{len(a)}, {len(b)} and {len(human)} rows: the bootstrap is paired")
    (as_, ac), (bs, bc), (hs, hc) = sums_and_counts(a), sums_and_counts(b), sums_and_counts(human)
    h = _ratio(hs.sum(), hc.sum())
    diff = abs(_ratio(as_.sum(), ac.sum()) - h) - abs(_ratio(bs.sum(), bc.sum()) - h)
    result: dict[str, Any] = {"diff": diff, "lo": None, "hi": None}
    n = len(a)
    if n_boot <= 0 or n < 2 or not np.isfinite(diff):
        return result
    idx = _resample(n, n_boot, seed, 7919)
    hr = _resampled_rate(hs, hc, idx)
    bounds = _percentiles(np.abs(_resampled_rate(as_, ac, idx) - hr) - np.abs(_resampled_rate(bs, bc, idx) - hr), level)
    if bounds is not None:
        result["lo"], result["hi"] = bounds
    return result


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def _resample(n: int, n_boot: int, seed: int, salt: int) -> np.ndarray:
    """[n_boot, n] passage indices drawn with replacement: one resampling for every rate compared."""
    return np.random.default_rng([int(seed), salt]).integers(0, n, size=(int(n_boot), n))


def _resampled_rate(sums: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The pooled rate of each resampling (NaN where it drew no tokens)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[idx].sum(axis=1) / counts[idx].sum(axis=1)


def _percentiles(d: np.ndarray, level: float) -> tuple[float, float] | None:
    """The central `level` interval of the finite resampled values; None when there are none."""
    d = d[np.isfinite(d)]
    if d.size == 0:
        return None
    tail = (1 - level) / 2
    lo, hi = np.quantile(d, [tail, 1 - tail])
    return float(lo), float(hi)


def position_curve(per_sample: Sequence[np.ndarray], length: int, buckets: int) -> dict[str, Any]:
    """Mean entropy in `buckets` equal buckets of position 0..length-1, pooled over samples.

    Why: a method can match the human entropy rate on average while drifting along the text
    (e.g. top-p starting fine and collapsing into repetition, entropy falling towards 0); the curve
    shows where. Bucket b holds positions t with floor(t * buckets / length) = b; buckets are capped
    at `length` so none is empty by construction. Returns {"edges": [buckets+1 positions],
    "centers": [...], "mean": [... or NaN when no sample reached the bucket], "count": [...]}.
    """
    if length < 1 or buckets < 1:
        raise ValueError("length and buckets must be >= 1")
    b = min(int(buckets), int(length))
    sums = np.zeros(b)
    counts = np.zeros(b, dtype=np.int64)
    for a in per_sample:
        a = np.asarray(a, dtype=np.float64)[:length]
        if not a.size:
            continue
        which = (np.arange(a.size) * b) // length
        sums += np.bincount(which, weights=a, minlength=b)
        counts += np.bincount(which, minlength=b)
    edges = np.ceil(np.arange(b + 1) * length / b).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    centers = (edges[:-1] + edges[1:] - 1) / 2.0
    return {"edges": edges.tolist(), "centers": centers.tolist(), "mean": mean.tolist(), "count": counts.tolist()}
