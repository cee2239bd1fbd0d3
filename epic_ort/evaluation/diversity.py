"""Diversity and repetition of a set of samples, on token ids (one model's tokenizer: figures compare
methods on one model, not across tokenizers)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np




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


def self_bleu(samples: Sequence[Sequence[int]], max_n: int = 4, epsilon: float = 0.1) -> float:
    """Mean BLEU-max_n of each sample against all the others as references (Zhu et al. 2018, Texygen):
    high when the samples repeat one another, whatever each one's own variety (distinct-n counts
    within the pooled set, so it cannot tell one text repeated from many different ones).

    BLEU: geometric mean of the clipped n-gram precisions (a hypothesis n-gram counts at most as often
    as it occurs in the one reference holding it most), zero counts smoothed to epsilon / total (NLTK's
    method 1), times the brevity penalty against the reference closest in length. Samples with no
    n-grams at all are skipped; NaN with fewer than two samples."""
    texts = [[int(t) for t in s] for s in samples]
    if len(texts) < 2:
        return float("nan")
    counts = [[Counter(_ngrams(t, n)) for n in range(1, max_n + 1)] for t in texts]
    best = [_top_two(c[n] for c in counts) for n in range(max_n)]  # per n: gram -> ((count, owner), second count)
    lengths = np.array([len(t) for t in texts])
    scores = []
    for i, t in enumerate(texts):
        if not t:
            continue
        logs = []
        for n in range(max_n):
            total = max(len(t) - n, 0)
            if total == 0:
                logs.append(math.log(epsilon))  # no n-gram of this order: smoothed like a zero count
                continue
            match = sum(min(c, _max_other(best[n], g, i)) for g, c in counts[i][n].items())
            logs.append(math.log(match / total if match else epsilon / total))
        ref = min((int(x) for x in np.delete(lengths, i)), key=lambda r: (abs(r - len(t)), r))  # closest, then shorter
        bp = 1.0 if len(t) > ref else math.exp(1 - ref / len(t))
        scores.append(bp * math.exp(sum(logs) / max_n))
    return float(np.mean(scores)) if scores else float("nan")


def _top_two(counters: Sequence[Counter]) -> dict[tuple[int, ...], tuple[int, int, int]]:
    """gram -> (largest count, the sample holding it, second largest count) over the samples."""
    top: dict[tuple[int, ...], tuple[int, int, int]] = {}
    for owner, counter in enumerate(counters):
        for g, c in counter.items():
            first, who, second = top.get(g, (0, -1, 0))
            if c > first:
                top[g] = (c, owner, first)
            else:
                top[g] = (first, who, max(second, c))
    return top


def _max_other(top: dict[tuple[int, ...], tuple[int, int, int]], gram: tuple[int, ...], me: int) -> int:
    first, who, second = top.get(gram, (0, -1, 0))
    return second if who == me else first
