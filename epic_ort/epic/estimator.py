"""Rao-Blackwellized lookahead entropy Ĥ(y) for many candidates at once.

    Ĥ(y) = (1/R) Σ_r Σ_{j<k} Entropy(q(· | x, y, rollout_r[:j]))

All candidates of a block (from any rows of the batch) run together: depth 0 feeds the candidates
(R copies would compute the same thing, so it runs once per candidate), then R rollouts per
candidate, and each further depth is one model call. The prefix is never re-run. Depth 0's logits
and cache are returned so the chosen candidate's next decoding step costs nothing.

How the candidates are laid out in model rows depends on the graph: token trees (`tree.py`, lean
graphs) or forked rows (`forked.py`, any graph). Rollout randomness comes from per-candidate
uniforms supplied by the caller, so Ĥ(y) does not depend on which other candidates shared the call.

Depth 0 already gives Ĥ's first term exactly, and each further depth adds one term. Before each
further depth a caller-supplied `keep` looks at the terms computed so far and says which candidates
go on (R rows each per depth): the sampler stops those that can no longer win, at no extra call.
`run_ahead` and `given` are the optional run-ahead policy's hooks (`run_ahead.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from ..sampling.kernels import entropy_and_draws
from ..sampling.processors import ProcessorList
from .forked import ForkedRows
from .policies import Keep
from .run_ahead import Continuation, Given, RunAheadHook, can_run_ahead, first_terms, given_rollouts
from .tree import TreeBranches, TreeRows


@dataclass
class Lookahead:
    entropy: np.ndarray  # [n] Ĥ per candidate; NaN where `keep` stopped its rollouts early
    first_entropy: np.ndarray  # [n] the depth-0 term of Ĥ (exact, no rollouts)
    complete: np.ndarray  # [n] bool: Ĥ is the full estimate
    lower: np.ndarray  # [n] the terms of Ĥ computed (all of Ĥ where complete): a lower bound on Ĥ
    terms: np.ndarray  # [n] how many of the k terms `lower` holds
    candidate_tokens: np.ndarray  # [n] tokens each candidate ran through the model (itself and its rollouts)
    first_logits: np.ndarray  # [n, V] raw logits of q(. | x, y)
    first_cache: KVCache | TreeBranches  # .select(candidates): the cache after the prefix plus y
    calls: int  # model calls made
    ahead: list[Continuation] = field(default_factory=list)  # the next step's first depths, run ahead
    ahead_tokens: np.ndarray | None = None  # [n] tokens run ahead after each candidate (not in candidate_tokens)


class CandidateProcessors:
    """Each candidate's own processors, for a call whose candidates come from rows with different
    settings (the serving engine batches rows of many requests). Row i of the logits it is applied
    to belongs to candidate owners[i] (default: row i is candidate i); rows with the same list are
    processed together, so each row gets exactly what its own list gives it alone."""

    def __init__(self, per_candidate: Sequence[ProcessorList], owners: np.ndarray | None = None):
        self.per_candidate = list(per_candidate)
        self.owners = np.arange(len(self.per_candidate)) if owners is None else np.asarray(owners, dtype=np.int64)

    def rows(self, owners: np.ndarray) -> "CandidateProcessors":
        """The processors of rows that belong to candidates `owners` (e.g. R rollouts each)."""
        return CandidateProcessors(self.per_candidate, owners)

    def apply(self, scores: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        lists = [self.per_candidate[o] for o in self.owners.tolist()]
        kinds: dict[int, list[int]] = {}
        for i, procs in enumerate(lists):
            kinds.setdefault(id(procs), []).append(i)
        if len(kinds) == 1:
            return lists[0].apply(scores, history)
        out: np.ndarray | None = None
        for idx in kinds.values():
            part = lists[idx[0]].apply(scores[idx])
            out = np.empty(scores.shape, dtype=part.dtype) if out is None else out
            out[idx] = part
        return out  # type: ignore[return-value]


def _on_rows(procs: ProcessorList | CandidateProcessors, owners: np.ndarray) -> ProcessorList | CandidateProcessors:
    return procs.rows(owners) if isinstance(procs, CandidateProcessors) else procs


@dataclass
class _Terms:
    """Ĥ's terms as the depths add them: h0 exact, `lower` the sum so far, `terms` how many."""

    h0: np.ndarray
    lower: np.ndarray
    terms: np.ndarray
    cand_tokens: np.ndarray
    ahead: list[Continuation]
    ahead_tokens: np.ndarray


def lookahead_entropy(
    model: CausalLM,
    cache: KVCache,
    parents: Sequence[int],
    candidates: Sequence[int],
    uniforms: np.ndarray,
    horizon: int,
    processors: ProcessorList | CandidateProcessors | None = None,
    keep: Keep | None = None,
    run_ahead: RunAheadHook | None = None,
    given: Given | None = None,
) -> Lookahead:
    """Ĥ for candidate i = token candidates[i] appended to cache row parents[i].

    uniforms: [n, R, horizon-1] in [0, 1), the rollout draws of each candidate (inverse CDF).
    An entropy after EOS counts as 0; rollouts also stop at the model's context limit.
    keep(idx, lower, terms): before each further depth, given the candidates still running (indices
    into `candidates`), the sum of their first `terms` terms of Ĥ (rollout means), a bool mask of
    those whose rollouts go on. The others come back incomplete, with `lower` as a lower bound.
    run_ahead(idx, lower, logits0, runs): before each of the last two depths that runs a call,
    given the candidates going on and their terms so far (as for `keep`), every candidate's
    depth-0 logits and the continuations run ahead so far in this lookahead: the next step's first
    blocks to run as children of candidates, and, for continuations run at the depth before, which
    of their tokens go on and the R first rollout tokens of each. Used where `can_run_ahead(model)`.
    given: the depths an earlier lookahead ran ahead for these candidates; the rest runs as usual.
    Ignored (all run) where it cannot be used.
    """
    parents = np.asarray(parents, dtype=np.int64)
    cands = np.asarray(candidates, dtype=np.int64)
    procs = processors if processors is not None else ProcessorList()
    layout: TreeRows | ForkedRows = (TreeRows(model, cache, parents, uniforms.shape[1], horizon)
                                     if model.supports_trees else ForkedRows(model, horizon))
    ahead_ok = can_run_ahead(model)
    given = given if ahead_ok else None
    logits0, first_cache = layout.first(cache, parents, cands, given)
    room = model.max_positions - int(cache.next_position[parents].max() + 1)
    depth = min(horizon, room + 1)
    eos = np.array(sorted(model.eos_token_ids), dtype=np.int64)
    alive0 = ~np.isin(cands, eos)
    h0, draws0 = first_terms(procs.apply(logits0), uniforms[:, :, 0] if depth > 1 else None, given)
    h0 = np.where(alive0, h0, 0.0)
    n = cands.size
    t = _Terms(h0, h0.copy(), np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64), [],
               np.zeros(n, dtype=np.int64))
    t.cand_tokens[layout.ran_first] = 1  # depth 0 run in this call (not given)
    if depth > 1:
        hook = run_ahead if ahead_ok and depth == horizon and room >= 2 else None
        _rollouts(layout, t, logits0, draws0, alive0, uniforms, depth, eos, procs, keep, hook, given)
    complete = t.terms >= depth
    return Lookahead(np.where(complete, t.lower, np.nan), t.h0, complete, t.lower, t.terms, t.cand_tokens, logits0,
                     first_cache, layout.calls, t.ahead, t.ahead_tokens)


def _rollouts(layout: TreeRows | ForkedRows, t: _Terms, logits0: np.ndarray, draws0: np.ndarray, alive0: np.ndarray,
              uniforms: np.ndarray, depth: int, eos: np.ndarray, procs: ProcessorList | CandidateProcessors,
              keep: Keep | None, run_ahead: RunAheadHook | None, given: Given | None) -> None:
    """Depths 1 .. depth-1: R rollouts per candidate still going on, one call a depth."""
    active = np.arange(t.h0.size)
    if keep is not None:
        active = active[np.asarray(keep(active, t.lower, 1), dtype=bool)]
    placed = given_rollouts(given, draws0)  # given: token trees only
    if placed is not None:  # what was run ahead goes on (the rest stops: a later round resumes it if need be)
        active = active[given.went_on[active]]  # type: ignore[union-attr]
    if not active.size:
        return
    rollouts = uniforms.shape[1]
    tile = np.repeat(active, rollouts)
    layout.start_rollouts(tile)
    z, alive = draws0[active].reshape(-1), alive0[tile]
    acc = np.zeros(tile.size, dtype=np.float64)
    u = uniforms[active].reshape(tile.size, -1)
    for j in range(1, depth):
        alive &= ~np.isin(z, eos)
        if j == 1 and placed is not None:  # run ahead by the step before: placed, not run
            logits_j = layout.place_rollouts(z, *placed(active))  # type: ignore[union-attr]
        else:
            logits_j = _step(layout, t, z, j, active, logits0, run_ahead if depth - 2 <= j else None)
            t.cand_tokens[active] += rollouts
        scores_j = _on_rows(procs, np.repeat(active, rollouts)).apply(logits_j)
        h_j, draws = entropy_and_draws(scores_j, u[:, j] if j + 1 < depth else None)
        acc += np.where(alive, h_j, 0.0)
        t.lower[active] = t.h0[active] + acc.reshape(active.size, rollouts).mean(axis=1)
        t.terms[active] = j + 1
        if j + 1 == depth:
            break
        z = draws[:, 0]  # type: ignore[index]
        if keep is not None:
            go = np.asarray(keep(active, t.lower[active], j + 1), dtype=bool)
            if not go.all():
                rows_go = np.repeat(go, rollouts)
                active = active[go]
                if not active.size:
                    return
                layout.keep(rows_go)
                z, alive, acc, u = z[rows_go], alive[rows_go], acc[rows_go], u[rows_go]


def _step(layout: TreeRows | ForkedRows, t: _Terms, z: np.ndarray, j: int, active: np.ndarray,
          logits0: np.ndarray, run_ahead: RunAheadHook | None) -> np.ndarray:
    """One rollout depth; the next step's tokens ride along where `run_ahead` asks for some."""
    firsts, extend = run_ahead(active, t.lower[active], logits0, t.ahead) if run_ahead is not None else ([], [])
    if not (firsts or extend):
        return layout.step(z, j)
    logits_j, ran = layout.step_ahead(z, j, firsts, extend)  # type: ignore[union-attr]
    t.ahead.extend(ran)
    for run in ran:
        t.ahead_tokens[run.candidate] += run.tokens.size
    for run, _, tokens in extend:
        t.ahead_tokens[run.candidate] += tokens.size
    return logits_j
