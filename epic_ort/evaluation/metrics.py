"""Figures for judging a decoding method against real text (used by `epic-ort evaluate`).

The question EPIC answers is whether generated text is as predictable *to the model itself* as
human text is. So every entropy here is the entropy of the BASE model's next-token distribution q
(no processors, temperature 1), measured along a sequence by teacher forcing: the same yardstick
for human continuations and for every sampler's output, whatever distribution the sampler drew
from. The gap between a method's entropy rate and the human one is its calibration error.

Apart from the teacher-forced forward pass (`score_continuations` and its wrappers), everything
here is a pure NumPy function of token ids or per-position arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..runtime.model import CausalLM, left_pad
from ..sampling.kernels import entropy, log_softmax

# Teacher-forced logits are [rows, T, V] float32; keep one forward's logits under this many bytes
# (a 49k vocabulary at 256 positions is ~50 MB a row).
LOGITS_BUDGET_BYTES = 512 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# teacher-forced entropies and log-loss
# ---------------------------------------------------------------------------------------------


def score_continuations(
    model: CausalLM,
    prompt_ids: Sequence[Sequence[int]],
    continuation_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (prompt, continuation) row: (entropies, log-losses), both float64 [len(continuation)].

    entropies[t] = H(q(.|prompt, cont[:t])) in nats and log_losses[t] = -log q(cont[t]|prompt, cont[:t]),
    for t = 0..len-1, where q is the base model's distribution (raw logits, no processors).

    Why teacher forcing: one forward over prompt + cont[:-1] gives the model's prediction at every
    continuation position at once, exactly what step-by-step decoding would have seen (position
    ids and attention mask follow `CausalLM.forward`'s left-padding rules, as in `prefill`), so
    human text and samples are scored by the same pass. Rows are left-padded and run `batch_size`
    at a time (fewer when the [rows, T, V] logits would exceed LOGITS_BUDGET_BYTES).
    """
    if len(prompt_ids) != len(continuation_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuation_ids)} continuations")
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(prompt_ids)
    rows = []
    for i, (p, c) in enumerate(zip(prompt_ids, continuation_ids)):
        p, c = [int(x) for x in p], [int(x) for x in c]
        if not p:
            raise ValueError(f"row {i}: empty prompt (the first continuation token needs a context)")
        if c:
            rows.append((i, p, c))
    if not rows:
        return out
    width = max(len(p) + len(c) - 1 for _, p, c in rows)
    vocab = int(model.vocab_size)
    per_forward = max(1, min(int(batch_size), LOGITS_BUDGET_BYTES // max(1, width * vocab * 4)))
    pad = model.manifest.pad_token_id or 0
    for start in range(0, len(rows), per_forward):
        chunk = rows[start : start + per_forward]
        ids, mask = left_pad([p + c[:-1] for _, p, c in chunk], pad_id=pad)
        logits, _ = model.forward(ids, model.empty_cache(len(chunk)), mask, last_only=False)
        w = ids.shape[1]
        for j, (i, p, c) in enumerate(chunk):
            # row j's last real token sits at column w-1; its first continuation prediction is
            # made at the prompt's last token, len(c) - 1 columns earlier
            row_logits = logits[j, w - len(c) : w]
            h = entropy(row_logits)
            logq = log_softmax(row_logits.astype(np.float64))
            nll = -logq[np.arange(len(c)), np.asarray(c, dtype=np.int64)]
            out[i] = (h.astype(np.float64), nll.astype(np.float64))
    return out


def entropy_and_logloss(
    model: CausalLM, prompt_ids: Sequence[int], continuation_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """One row of `score_continuations`: (entropies, log-losses) along `continuation_ids`."""
    return score_continuations(model, [prompt_ids], [continuation_ids])[0]


def entropy_along(model: CausalLM, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> np.ndarray:
    """Entropy (nats) of the base model's next-token distribution at each continuation position:
    H(q(.|prompt, cont[:t])) for t = 0..len-1 (see `score_continuations`). The mean of this along
    a text is its entropy rate under the model, the quantity EPIC aligns with human text."""
    return entropy_and_logloss(model, prompt_ids, continuation_ids)[0]


# ---------------------------------------------------------------------------------------------
# entropy rate and its calibration error
# ---------------------------------------------------------------------------------------------


def sums_and_counts(per_sample: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample totals and lengths: what pooled means and their bootstrap are computed from."""
    sums = np.array([float(np.sum(a)) for a in per_sample], dtype=np.float64)
    counts = np.array([len(a) for a in per_sample], dtype=np.float64)
    return sums, counts


def pooled_mean(per_sample: Sequence[np.ndarray]) -> float:
    """Mean over all positions of all samples (NaN when there are none).

    Pooled rather than a mean of per-sample means, so that the entropy rate is per token, as the
    model's log-loss is; a sample that stopped early at EOS simply contributes fewer positions.
    """
    sums, counts = sums_and_counts(per_sample)
    total = counts.sum()
    return float(sums.sum() / total) if total > 0 else float("nan")


def entropy_rate(per_sample: Sequence[np.ndarray]) -> float:
    """Entropy rate (nats/token) of a set of texts under the model: the pooled mean of their
    per-position entropies."""
    return pooled_mean(per_sample)


def per_sample_means(per_sample: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of each sample's array (NaN for an empty one): the per-prompt figures behind a rate."""
    return np.array([float(np.mean(a)) if len(a) else float("nan") for a in per_sample], dtype=np.float64)


def calibration_error(
    method: Sequence[np.ndarray],
    human: Sequence[np.ndarray],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """|entropy rate(method) - entropy rate(human)| with a paired bootstrap interval over prompts.

    `method[i]` and `human[i]` are the per-position entropies of the sample and of the human
    continuation for prompt i. Why paired: both come from the same prompt, and prompts differ far
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
    rng = np.random.default_rng([int(seed), 104729])
    idx = rng.integers(0, n, size=(int(n_boot), n))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = ms[idx].sum(axis=1) / mc[idx].sum(axis=1) - hs[idx].sum(axis=1) / hc[idx].sum(axis=1)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return result
    tail = (1 - level) / 2
    d_lo, d_hi = (float(x) for x in np.quantile(d, [tail, 1 - tail]))
    if d_lo <= 0 <= d_hi:
        lo, hi = 0.0, max(-d_lo, d_hi)
    else:
        lo, hi = min(abs(d_lo), abs(d_hi)), max(abs(d_lo), abs(d_hi))
    result.update(lo=lo, hi=hi, diff_lo=d_lo, diff_hi=d_hi)
    return result


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


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


# ---------------------------------------------------------------------------------------------
# diversity and repetition (on token ids)
# ---------------------------------------------------------------------------------------------


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    t = [int(x) for x in tokens]
    return [tuple(t[i : i + n]) for i in range(len(t) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / total n-grams over all samples together (NaN if there are no n-grams).

    Why: the standard diversity measure (Li et al., 2016); low values mean the method keeps
    producing the same phrases across prompts and within a sample. Computed on token ids, so it
    compares methods on one model, not across tokenizers.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for s in samples:
        grams = _ngrams(s, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else float("nan")


def repeated_ngram_fraction(samples: Sequence[Sequence[int]], n: int = 4) -> float:
    """Per sample, the share of its n-grams that already occurred earlier in the same sample;
    averaged over samples that have at least one n-gram (NaN if none has).

    Why: degenerate repetition loops (the failure of greedy and low-temperature decoding) show up
    as a high share of repeated 4-grams within a sample, while human text sits near 0.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    shares = []
    for s in samples:
        grams = _ngrams(s, n)
        if not grams:
            continue
        seen: set[tuple[int, ...]] = set()
        repeats = 0
        for g in grams:
            if g in seen:
                repeats += 1
            else:
                seen.add(g)
        shares.append(repeats / len(grams))
    return float(np.mean(shares)) if shares else float("nan")
