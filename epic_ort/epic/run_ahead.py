"""Running the next step ahead: an optional policy that changes what EPIC costs, never what it samples.

A next step's candidates are children of this step's winner in the token tree, and their first
rollout tokens grandchildren. So, at batch 1, before the lookahead's last two depths the candidate
leading on the terms computed so far gets the next step's first block, chosen with the next step's
own Gumbels (drawn from a copy of the row's random stream, which then draws the same numbers at the
next step), run as its children in the call of depth k−2; if it still leads at depth k−1, that
block's first rollout tokens ride in the last call. If it wins, the next step places those logits
and key/value columns in its tree and starts at depth 2: k−2 calls instead of k.

What is computed is the same either way (the same tokens at the same positions over the same keys),
up to float rounding from the calls' different shapes, as between any two block layouts.

Only token trees written in place can take it (`can_run_ahead`), and only calls of one batch row
run ahead: with several rows calls are wide, so a saved call is worth little more than its tokens,
and every row's tree is padded to the widest (bench/README has the figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..chooser import Row
from ..sampling.kernels import entropy_and_draws, log_softmax
from ..sampling.processors import ProcessorList
from ..sampling.sample import gumbel
from .lazy import LazySearch
from .policies import FirstBlockPolicy, RolloutPruner, RowMemory

if TYPE_CHECKING:
    from ..runtime.model import CausalLM

# Most tokens one request to run ahead adds to a call: a wide tree makes every token dearer and its
# winner less certain, so a wide request costs more than the calls it saves when its guess misses.
# A next step expected to need up to twice this many candidates runs its top ones ahead; one
# expected to need more runs nothing ahead.
AHEAD_TOKENS = 32


@dataclass
class Continuation:
    """The next step's first depths for a few tokens after one candidate, run ahead: what
    `lookahead_entropy` takes back as `given` once that candidate has been chosen."""

    candidate: int  # index into the call's candidates: the token these continue
    tokens: np.ndarray  # [m] the next step's candidates
    logits: np.ndarray  # [m, V] raw logits of q(. | x, candidate, token)
    columns: list[np.ndarray]  # per cache tensor [m, kv_heads, head_dim]: each token's keys/values
    keys: np.ndarray  # [m] their key columns in the tree that ran them (to run their rollouts next)
    entropy: np.ndarray | None = None  # [m] entropy of each token's (processed) q, where already computed
    draws: np.ndarray | None = None  # [m, R] and the next step's first rollout draws from it
    went_on: np.ndarray | None = None  # [m] bool: those whose depth-1 rollouts were run too, then:
    rollout_tokens: np.ndarray | None = None  # [g, R] their first rollout tokens (g = went_on.sum())
    rollout_logits: np.ndarray | None = None  # [g * R, V]
    rollout_columns: list[np.ndarray] | None = None  # per cache tensor [g * R, kv_heads, head_dim]


@dataclass
class Given:
    """Depths of a lookahead's candidates already run (by an earlier step's run-ahead), in
    candidate order: depth 0 for those in `have`, depth-1 rollouts too for those in `went_on`."""

    have: np.ndarray  # [n] bool
    logits: np.ndarray  # [have.sum(), V]
    columns: list[np.ndarray]  # per cache tensor [have.sum(), kv_heads, head_dim]
    entropy: np.ndarray  # [have.sum()] the depth-0 entropies already computed (NaN: not computed)
    draws: np.ndarray  # [have.sum(), R] and the first rollout draws (with this lookahead's uniforms)
    went_on: np.ndarray  # [n] bool, within have
    rollout_tokens: np.ndarray  # [went_on.sum(), R]
    rollout_logits: np.ndarray  # [went_on.sum() * R, V]
    rollout_columns: list[np.ndarray]  # per cache tensor [went_on.sum() * R, kv_heads, head_dim]


Firsts = list[tuple[int, np.ndarray]]  # (candidate, the next step's tokens to run as its children)
Extends = list[tuple[Continuation, np.ndarray, np.ndarray]]  # (run, which go on, their first rollout tokens [g, R])
# run_ahead(idx, lower, logits0, runs) -> (firsts, extends); see estimator.lookahead_entropy
RunAheadHook = Callable[[np.ndarray, np.ndarray, np.ndarray, list[Continuation]], tuple[Firsts, Extends]]


def can_run_ahead(model: "CausalLM") -> bool:
    """Whether `run_ahead`/`given` apply: token trees written in place, into NumPy buffers."""
    return model.supports_trees and model.kv_in_place


def first_terms(scores0: np.ndarray, uniforms: np.ndarray | None, given: Given | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Depth 0's entropies and first rollout draws (`entropy_and_draws`), except where `given`
    already has them."""
    known = np.zeros(len(scores0), dtype=bool)
    if given is not None and uniforms is not None:
        have = np.flatnonzero(given.have)
        known[have[np.isfinite(given.entropy)]] = True
    if not known.any():
        return entropy_and_draws(scores0, uniforms)
    h0 = np.empty(len(scores0), dtype=np.float64)
    draws = np.empty(uniforms.shape, dtype=np.int64)  # type: ignore[union-attr]
    at = np.isfinite(given.entropy)  # type: ignore[union-attr]
    h0[known], draws[known] = given.entropy[at], given.draws[at]  # type: ignore[union-attr]
    rest = np.flatnonzero(~known)
    if rest.size:
        h0[rest], draws[rest] = entropy_and_draws(scores0[rest], uniforms[rest])  # type: ignore[index, assignment]
    return h0, draws


def given_rollouts(given: Given | None, draws0: np.ndarray
                   ) -> Callable[[np.ndarray], tuple[np.ndarray, list[np.ndarray]]] | None:
    """If `given` holds depth-1 rollouts, and they are the ones this lookahead draws (the same
    first tokens), a function of the candidates going on (within `given.went_on`) giving their
    rollout rows' logits and key/value columns; else None."""
    if given is None or not given.went_on.any():
        return None
    if not np.array_equal(draws0[given.went_on], given.rollout_tokens):
        return None
    rollouts = given.rollout_tokens.shape[1]
    at = np.cumsum(given.went_on) - 1  # each candidate's place among those that went on

    def rows_of(active: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        idx = (at[active][:, None] * rollouts + np.arange(rollouts)).reshape(-1)
        return given.rollout_logits[idx], [c[idx] for c in given.rollout_columns]

    return rows_of


@dataclass
class AheadRun:
    """A row's next step's first depths, run ahead after the token it chose."""

    length: int  # len(row.generated) before that token
    token: int
    run: Continuation
    seed: int  # the next step's rollout seed it assumed (its draws are those of that seed)


class RunAheadPolicy:
    """The chooser's side of running ahead: what to run for the next step, and taking it back."""

    def __init__(self, alpha: float, horizon: int, rollouts: int, processors: ProcessorList,
                 first_block: FirstBlockPolicy, pruner: RolloutPruner | None,
                 rollout_uniforms: Callable[[int, int], np.ndarray],
                 row_params: Callable[[Row], tuple[float, ProcessorList]] | None = None):
        self.alpha, self.horizon, self.rollouts = alpha, horizon, rollouts
        self.processors, self.first_block, self.pruner = processors, first_block, pruner
        self.rollout_uniforms = rollout_uniforms
        # each row's (alpha, processors): the chooser's own, or the row's (the serving engine's rows)
        self.params = row_params or (lambda row: (self.alpha, self.processors))

    def take(self, row: Row, memory: RowMemory, search: LazySearch, seed: int) -> Continuation | None:
        """What the last step ran ahead after the token it chose, if this step's row and random
        draws are the ones it assumed and every one of its tokens can still be sampled (else the
        step runs all itself)."""
        ahead, memory.ahead = memory.ahead, None
        if ahead is None or len(row.generated) != ahead.length + 1 or row.generated[-1] != ahead.token \
                or ahead.seed != seed:
            return None
        if not np.isfinite(search.bound[ahead.run.tokens]).all():
            return None
        return ahead.run

    def keep_for_next(self, row: Row, memory: RowMemory, chosen: int, runs: dict[int, Continuation],
                      seeds: dict[int, int]) -> None:
        if chosen in runs:
            memory.ahead = AheadRun(len(row.generated), chosen, runs[chosen], seeds[chosen])

    def given_for_call(self, per_row: Sequence[tuple[int, np.ndarray, list[int]]],
                       given: Sequence[Continuation | None], n: int) -> Given:
        """`given` for a first round's lookahead call (all its candidates, in request order): what
        was run ahead for the rows that have it."""
        have, went_on = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        runs = []
        for i, _, slots in per_row:
            run = given[i]
            if run is not None:
                have[slots] = True
                if run.went_on is not None:
                    went_on[np.asarray(slots)[run.went_on]] = True
                runs.append(run)
        cat = lambda parts: parts[0] if len(parts) == 1 else np.concatenate(parts)  # noqa: E731 (one row: no copy)
        logits = cat([r.logits for r in runs])
        columns = [cat(cols) for cols in zip(*(r.columns for r in runs))]
        deeper = [r for r in runs if r.went_on is not None]
        if deeper:
            r_tokens = cat([r.rollout_tokens for r in deeper])
            r_logits = cat([r.rollout_logits for r in deeper])
            r_columns = [cat(cols) for cols in zip(*(r.rollout_columns for r in deeper))]  # type: ignore[misc]
        else:
            r_tokens, r_logits = np.zeros((0, self.rollouts), dtype=np.int64), logits[:0]
            r_columns = [c[:0] for c in columns]
        entropy = cat([r.entropy if r.entropy is not None else np.full(r.tokens.size, np.nan) for r in runs])
        draws = cat([r.draws if r.draws is not None else np.full((r.tokens.size, self.rollouts), -1) for r in runs])
        return Given(have, logits, columns, entropy, draws, went_on, r_tokens, r_logits, r_columns)

    def hook(self, row: Row, memory: RowMemory, search: LazySearch,
             tokens: Sequence[int], eos_ids: Sequence[int], seeds: dict[int, int]) -> RunAheadHook:
        """`run_ahead` for one lookahead call of one row (candidates `tokens`). Before each of its last
        two depths the candidate leading on the terms of Ĥ computed so far gets the next step's first
        block (sized as the first block is, at most AHEAD_TOKENS); if it still leads at the last
        depth, that block's first rollout tokens too, for the candidates the first round's pruner
        would let go on. Nothing where the best so far comes from an earlier call (its tree is gone),
        the leader is an end-of-sequence token, or the next step would need over 2·AHEAD_TOKENS."""
        toks = np.asarray(tokens, dtype=np.int64)
        eos = np.array(sorted(int(t) for t in eos_ids), dtype=np.int64)
        plans: dict[int, tuple[LazySearch, int]] = {}  # candidate -> the next step's search and rollout seed
        procs = self.params(row)[1]

        def ask(idx: np.ndarray, lower: np.ndarray, logits0: np.ndarray, runs: list[Continuation]) -> Any:
            partial = search.bound[toks[idx]] - search.alpha * lower
            lead = int(idx[int(np.argmax(partial))])
            if toks[lead] in eos or (search.best_token >= 0 and search.best_score >= partial.max()):
                return [], []
            run = next((r for r in runs if r.candidate == lead), None)
            if run is None:
                nxt, seed = self.next_search(row, logits0[lead])
                plans[lead] = (nxt, seed)
                seeds[int(toks[lead])] = seed
                need = self.first_block.predicted_need(memory, nxt)
                if need > 2 * AHEAD_TOKENS:
                    return [], []
                block = nxt.next_block(max(1, min(need, AHEAD_TOKENS)))
                return ([(lead, block)] if block.size else []), []
            if run.went_on is not None:
                return [], []
            return [], self._rollouts_ahead(run, plans[lead], memory, eos, procs)

        return ask

    def _rollouts_ahead(self, run: Continuation, plan: tuple[LazySearch, int], memory: RowMemory,
                        eos: np.ndarray, procs: ProcessorList) -> Extends:
        """The next step's first rollout tokens for the run-ahead block the pruner lets go on."""
        search, seed = plan
        scores = procs.apply(run.logits)
        u = np.stack([self.rollout_uniforms(seed, t)[:, 0] for t in run.tokens.tolist()])
        run.entropy, run.draws = entropy_and_draws(scores, u)  # the next step takes them as they are
        h0 = np.where(np.isin(run.tokens, eos), 0.0, run.entropy)
        go = np.ones(run.tokens.size, dtype=bool)
        if self.pruner is not None and search.alpha != 0:
            go = self.pruner.goes_on(search, memory, run.tokens, h0, 1, expected=True)
        return [(run, go, run.draws[go])] if 0 < go.sum() * self.rollouts <= AHEAD_TOKENS else []

    def next_search(self, row: Row, logits: np.ndarray) -> tuple[LazySearch, int]:
        """The search and rollout seed the row's next step will have if `logits` are its next
        logits: the Gumbels and seed come from a copy of the row's stream, which draws the same
        numbers at the next step."""
        alpha, procs = self.params(row)
        logq = log_softmax(procs.apply(logits[None]))[0].astype(np.float64)
        stream = np.random.Generator(type(row.rng.bit_generator)())
        stream.bit_generator.state = row.rng.bit_generator.state
        g = gumbel(stream, logq.size)
        seed = int(stream.integers(2**63))
        return LazySearch(logq, g, alpha, self.horizon * math.log(logq.size)), seed
