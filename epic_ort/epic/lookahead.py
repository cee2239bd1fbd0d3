"""Rao-Blackwellized lookahead entropy Ĥ(y) for many candidates at once.

    Ĥ(y) = (1/R) Σ_r Σ_{j<k} Entropy(q(· | x, y, rollout_r[:j]))

All candidates of a block (from any rows of the batch) run together: the prefix cache is forked
once to the candidate rows, depth 0 feeds the candidates (R copies would compute the same thing,
so it runs once per candidate), then the cache is tiled to R rollouts per candidate and each
further depth is one ORT call. The prefix is never re-run. Depth 0's logits and cache are
returned so the chosen candidate's next decoding step costs nothing.

Rollout randomness comes from per-candidate uniforms supplied by the caller, so Ĥ(y) does not
depend on which other candidates shared the call.

Depth 0 already gives Ĥ's first term exactly. A caller-supplied `keep` looks at those terms and
says which candidates deserve rollouts (R·(k−1) rows each): the sampler drops those that can no
longer win, at no extra ORT call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..runtime.model import CausalLM, KVCache
from ..sampling.processors import ProcessorList, entropy_and_probs
from ..sampling.sample import inverse_cdf


@dataclass
class Lookahead:
    entropy: np.ndarray  # [n] Ĥ per candidate; NaN where `keep` dropped the rollouts
    first_entropy: np.ndarray  # [n] the depth-0 term of Ĥ (exact, no rollouts)
    complete: np.ndarray  # [n] bool: Ĥ is the full estimate
    first_logits: np.ndarray  # [n, V] raw logits of q(. | x, y)
    first_cache: KVCache  # n rows: the prefix plus y
    calls: int  # ORT calls made
    rows: int  # model rows run, over all calls


def lookahead_entropy(
    model: CausalLM,
    cache: KVCache,
    parents: Sequence[int],
    candidates: Sequence[int],
    uniforms: np.ndarray,
    horizon: int,
    processors: ProcessorList | None = None,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Lookahead:
    """Ĥ for candidate i = token candidates[i] appended to cache row parents[i].

    uniforms: [n, R, horizon-1] in [0, 1), the rollout draws of each candidate (inverse CDF).
    An entropy after EOS counts as 0; rollouts also stop at the model's context limit.
    keep: maps the depth-0 terms [n] to a bool mask of the candidates whose rollouts to run.
    """
    parents = np.asarray(parents, dtype=np.int64)
    cands = np.asarray(candidates, dtype=np.int64)
    n = cands.size
    eos = np.array(sorted(model.eos_token_ids), dtype=np.int64)
    procs = processors if processors is not None and len(processors) else None
    no_ids = np.zeros((n, 0), dtype=np.int64)

    logits0, cache0 = model.step(cands, cache.select(parents))  # the fork is freed as soon as the call returns
    calls = 1
    scores0 = procs(no_ids, logits0) if procs else logits0
    alive0 = ~np.isin(cands, eos)
    room = model.max_positions - int(cache0.next_position.max())
    depth = min(horizon, room + 1)
    h0, probs0 = entropy_and_probs(scores0, with_probs=depth > 1)
    h0 = np.where(alive0, h0, 0.0)
    h = h0.copy()
    rows = n

    complete = np.ones(n, dtype=bool) if keep is None or depth <= 1 else np.asarray(keep(h0), dtype=bool)
    full = np.flatnonzero(complete)
    if depth > 1 and full.size:
        rollouts = uniforms.shape[1]
        m = full.size * rollouts
        tile = np.repeat(full, rollouts)
        cache_r = cache0.select(tile)
        probs = probs0[tile]
        alive = alive0[tile]
        acc = np.zeros(m, dtype=np.float64)
        u = uniforms[full].reshape(m, -1)
        for j in range(1, depth):
            z = inverse_cdf(probs, u[:, j - 1])
            alive &= ~np.isin(z, eos)
            logits_j, cache_r = model.step(z, cache_r)
            calls += 1
            rows += m
            scores_j = procs(np.zeros((m, 0), dtype=np.int64), logits_j) if procs else logits_j
            h_j, probs = entropy_and_probs(scores_j, with_probs=j + 1 < depth)
            acc += np.where(alive, h_j, 0.0)
        h[full] += acc.reshape(full.size, rollouts).mean(axis=1)
    h[~complete] = np.nan
    return Lookahead(h, h0, complete, logits0, cache0, calls, rows)
