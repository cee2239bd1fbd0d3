"""Rao-Blackwellized lookahead entropy Ĥ(y) for many candidates at once.

    Ĥ(y) = (1/R) Σ_r Σ_{j<k} Entropy(q(· | x, y, rollout_r[:j]))

All candidates of a block (from any rows of the batch) run together: the prefix cache is forked
once to the candidate rows, depth 0 feeds the candidates (R copies would compute the same thing,
so it runs once per candidate), then the cache is tiled to R rollouts per candidate and each
further depth is one ORT call. The prefix is never re-run. Depth 0's logits and cache are
returned so the chosen candidate's next decoding step costs nothing.

Rollout randomness comes from per-candidate uniforms supplied by the caller, so Ĥ(y) does not
depend on which other candidates shared the call.

Depth 0 already gives Ĥ's first term exactly, and each further depth adds one term. Before each
further depth a caller-supplied `keep` looks at the terms computed so far and says which candidates
go on (R rows each per depth): the sampler stops those that can no longer win, at no extra ORT call.
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
    entropy: np.ndarray  # [n] Ĥ per candidate; NaN where `keep` stopped its rollouts early
    first_entropy: np.ndarray  # [n] the depth-0 term of Ĥ (exact, no rollouts)
    complete: np.ndarray  # [n] bool: Ĥ is the full estimate
    lower: np.ndarray  # [n] the terms of Ĥ computed (all of Ĥ where complete): a lower bound on Ĥ
    terms: np.ndarray  # [n] how many of the k terms `lower` holds
    candidate_rows: np.ndarray  # [n] model rows each candidate took
    first_logits: np.ndarray  # [n, V] raw logits of q(. | x, y)
    first_cache: KVCache  # n rows: the prefix plus y
    calls: int  # ORT calls made


Keep = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def lookahead_entropy(
    model: CausalLM,
    cache: KVCache,
    parents: Sequence[int],
    candidates: Sequence[int],
    uniforms: np.ndarray,
    horizon: int,
    processors: ProcessorList | None = None,
    keep: Keep | None = None,
) -> Lookahead:
    """Ĥ for candidate i = token candidates[i] appended to cache row parents[i].

    uniforms: [n, R, horizon-1] in [0, 1), the rollout draws of each candidate (inverse CDF).
    An entropy after EOS counts as 0; rollouts also stop at the model's context limit.
    keep(idx, lower, terms): before each further depth, given the candidates still running (indices
    into `candidates`), the sum of their first `terms` terms of Ĥ (rollout means), a bool mask of
    those whose rollouts go on. The others come back incomplete, with `lower` as a lower bound.
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
    lower = h0.copy()
    terms = np.ones(n, dtype=np.int64)
    cand_rows = np.ones(n, dtype=np.int64)

    active = np.arange(n)
    if depth > 1 and keep is not None:
        active = active[np.asarray(keep(active, lower, 1), dtype=bool)]
    if depth > 1 and active.size:
        rollouts = uniforms.shape[1]
        tile = np.repeat(active, rollouts)
        cache_r = cache0.select(tile)
        probs = probs0[tile]
        alive = alive0[tile]
        acc = np.zeros(tile.size, dtype=np.float64)
        u = uniforms[active].reshape(tile.size, -1)
        for j in range(1, depth):
            z = inverse_cdf(probs, u[:, j - 1])
            alive &= ~np.isin(z, eos)
            logits_j, cache_r = model.step(z, cache_r)
            calls += 1
            cand_rows[active] += rollouts
            scores_j = procs(np.zeros((tile.size, 0), dtype=np.int64), logits_j) if procs else logits_j
            h_j, probs = entropy_and_probs(scores_j, with_probs=j + 1 < depth)
            acc += np.where(alive, h_j, 0.0)
            lower[active] = h0[active] + acc.reshape(active.size, rollouts).mean(axis=1)
            terms[active] = j + 1
            if j + 1 < depth and keep is not None:
                go = np.asarray(keep(active, lower[active], j + 1), dtype=bool)
                if not go.all():
                    rows_go = np.repeat(go, rollouts)
                    active, tile = active[go], tile[rows_go]
                    if not active.size:
                        break
                    cache_r = cache_r.select(np.flatnonzero(rows_go))
                    probs, alive, acc, u = probs[rows_go], alive[rows_go], acc[rows_go], u[rows_go]
    complete = terms >= depth
    h = np.where(complete, lower, np.nan)
    return Lookahead(h, h0, complete, lower, terms, cand_rows, logits0, cache0, calls)
