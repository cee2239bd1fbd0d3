"""The one-step target ("lookahead"): fit EPIC's alpha so that the lookahead entropy the model expects
under q_a equals the one measured along real text, at real-text contexts.

Data side: mean over contexts of Ĥ(y_human), the lookahead entropy after the token the human wrote.
Model side: mean over contexts of E_{y~q_a}[Ĥ(y)] = E_q[e^{-aĤ}Ĥ] / E_q[e^{-aĤ}], estimated by
stratification: the head of q (the fewest tokens covering `head_mass`, at most `max_head`) enters
exactly with weight q(y); the tail enters through `tail_samples` draws from q restricted to the
tail, each weighted tail_mass / tail_samples. Both sums are then unbiased whatever alpha, the head
(where most of the mass and the variance is) costs no sampling noise, and the long tail that a
capped top-p list would silently drop is still represented. Ĥ does not depend on alpha, so it is
computed once per candidate and alpha is found by bisection on the monotone mean E_{q_a}[Ĥ].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..epic.estimator import lookahead_entropy
from ..progress import progress
from ..runtime.model import CausalLM
from ..sampling.kernels import log_softmax
from .corpus import Corpus, context_at, sample_positions

ALPHA_RANGE = (-10.0, 10.0)


@dataclass
class CalibrationSettings:
    horizon: int = 4
    rollouts: int = 2
    contexts: int = 128
    context_tokens: int = 128
    seed: int = 0
    head_mass: float = 0.9
    max_head: int = 12
    tail_samples: int = 4
    batch_contexts: int = 4
    bootstrap: int = 500


@dataclass
class EntropyMeasurements:
    """Everything alpha depends on, measured once."""

    data_h: np.ndarray  # [N] Ĥ(y_human)
    cand_logw: list[np.ndarray] = field(default_factory=list)  # per context: log weight of each candidate under q
    cand_h: list[np.ndarray] = field(default_factory=list)  # per context: Ĥ(y) of the candidates
    coverage: np.ndarray | None = None  # [N] q-mass of the candidates


def pad_candidates(cand_logw: Sequence[np.ndarray], cand_h: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-context candidates -> [N, M] matrices (padding has weight 0), for vectorized fits."""
    width = max(len(h) for h in cand_h)
    lw = np.full((len(cand_h), width), -np.inf)
    hh = np.zeros((len(cand_h), width))
    for i, (w, h) in enumerate(zip(cand_logw, cand_h)):
        lw[i, : len(w)] = w
        hh[i, : len(h)] = h
    return lw, hh


def expected_entropy(alpha: float, cand_logw: Sequence[np.ndarray] | np.ndarray,
                     cand_h: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """E_{y~q_a}[Ĥ(y)] per context from weighted candidates: Σ w e^{-aĤ} Ĥ / Σ w e^{-aĤ}."""
    lw, hh = (cand_logw, cand_h) if isinstance(cand_h, np.ndarray) else pad_candidates(cand_logw, cand_h)
    z = lw - alpha * hh
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z * hh).sum(axis=1) / z.sum(axis=1)


def fit_alpha(target: float, cand_logw: Sequence[np.ndarray] | np.ndarray, cand_h: Sequence[np.ndarray] | np.ndarray,
              lo: float = ALPHA_RANGE[0], hi: float = ALPHA_RANGE[1], tol: float = 1e-6) -> float:
    """Bisection for mean E_{q_a}[Ĥ] = target; the mean decreases in alpha. Clipped to [lo, hi]."""
    if not isinstance(cand_h, np.ndarray):
        cand_logw, cand_h = pad_candidates(cand_logw, cand_h)
    f = lambda a: float(expected_entropy(a, cand_logw, cand_h).mean()) - target  # noqa: E731
    if f(lo) <= 0:
        return lo
    if f(hi) >= 0:
        return hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def bootstrap_alpha(m: EntropyMeasurements, n_boot: int, seed: int) -> np.ndarray:
    """alpha refitted on contexts resampled with replacement: its spread is the standard error."""
    rng = np.random.default_rng([seed, 7919])
    lw, hh = pad_candidates(m.cand_logw, m.cand_h)
    n = len(m.data_h)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        out[b] = fit_alpha(float(m.data_h[idx].mean()), lw[idx], hh[idx], tol=1e-5)
    return out


def stratified_candidates(logq: np.ndarray, head_mass: float, max_head: int, tail_samples: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, log weights) such that Σ w f(y) is an unbiased estimate of E_q[f]: the head of q
    exactly, plus draws from the renormalised tail (repeats allowed) sharing the tail's mass."""
    cap = min(max_head, logq.size)
    top = np.argpartition(-logq, cap - 1)[:cap] if cap < logq.size else np.arange(logq.size)
    top = top[np.argsort(-logq[top], kind="stable")]
    q = np.exp(logq.astype(np.float64))
    cum = np.cumsum(q[top])
    head = top[: min(int(np.searchsorted(cum, head_mass) + 1), cap)]
    tail_q = q.copy()
    tail_q[head] = 0.0
    tail_mass = float(tail_q.sum())
    if tail_samples <= 0 or tail_mass <= 1e-12:
        return head, np.log(q[head])
    tail = rng.choice(q.size, size=tail_samples, p=tail_q / tail_mass)
    logw = np.concatenate([np.log(q[head]), np.full(tail_samples, np.log(tail_mass / tail_samples))])
    return np.concatenate([head, tail]), logw


def measure(model: CausalLM, corpus: Corpus, s: CalibrationSettings, *, show_progress: bool | None = None
            ) -> EntropyMeasurements:
    positions = sample_positions(corpus, s.contexts, s.context_tokens, 1, s.seed)
    data_h = np.empty(len(positions))
    m = EntropyMeasurements(data_h=data_h, coverage=np.empty(len(positions)))
    bar = progress(total=len(positions), desc="calibrating", unit="ctx", enable=show_progress)
    for start in range(0, len(positions), s.batch_contexts):
        batch = positions[start : start + s.batch_contexts]
        logits, cache = model.prefill([context_at(corpus, int(p), s.context_tokens) for p in batch])
        logq = log_softmax(logits).astype(np.float64)
        parents: list[int] = []
        tokens: list[int] = []
        spans = []
        for i, p in enumerate(batch):
            cands, logw = stratified_candidates(logq[i], s.head_mass, s.max_head, s.tail_samples,
                                                np.random.default_rng([s.seed, int(p), 1]))
            human = int(corpus.tokens[p])
            row = cands.tolist()
            if human not in row:
                row.append(human)
            spans.append((len(tokens), len(row), cands, logw, human))
            parents += [i] * len(row)
            tokens += row
        uniforms = np.stack([
            np.random.default_rng([s.seed, int(batch[par]), tok]).random((s.rollouts, s.horizon - 1))
            for par, tok in zip(parents, tokens)
        ])
        h = lookahead_entropy(model, cache, parents, tokens, uniforms, s.horizon).entropy
        for i, (lo, n, cands, logw, human) in enumerate(spans):
            row_h = h[lo : lo + n]
            row_tokens = tokens[lo : lo + n]
            m.data_h[start + i] = row_h[row_tokens.index(human)]
            m.cand_logw.append(logw)
            m.cand_h.append(row_h[: len(cands)])
            m.coverage[start + i] = float(np.exp(logq[i, np.unique(cands)]).sum())
        bar.update(len(batch))
    bar.close()
    return m


def calibrate_lookahead(model: CausalLM, corpus: Corpus, settings: CalibrationSettings | None = None, *,
                        show_progress: bool | None = None) -> dict[str, Any]:
    """The one-step target: measure, fit and bootstrap alpha (targets.calibrate writes the file)."""
    s = settings or CalibrationSettings()
    m = measure(model, corpus, s, show_progress=show_progress)
    target = float(m.data_h.mean())
    alpha = fit_alpha(target, m.cand_logw, m.cand_h)
    boot = bootstrap_alpha(m, s.bootstrap, s.seed)
    result = {
        "alpha": round(alpha, 6),
        "alpha_se": round(float(boot.std(ddof=1)), 6),
        "data_entropy": round(target, 6),
        "data_entropy_se": round(float(m.data_h.std(ddof=1) / np.sqrt(len(m.data_h))), 6),
        "model_entropy": round(float(expected_entropy(alpha, m.cand_logw, m.cand_h).mean()), 6),
        "model_entropy_at_alpha0": round(float(expected_entropy(0.0, m.cand_logw, m.cand_h).mean()), 6),
        "alpha_clipped": bool(alpha in ALPHA_RANGE),
        "horizon": s.horizon,
        "rollouts": s.rollouts,
        "contexts": s.contexts,
        "context_tokens": s.context_tokens,
        "head_mass": s.head_mass,
        "max_head": s.max_head,
        "tail_samples": s.tail_samples,
        "mean_candidate_mass": round(float(m.coverage.mean()), 4),
        "seed": s.seed,
    }
    return result
