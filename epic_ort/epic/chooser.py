"""EPIC's token chooser: a batched lazy Gumbel-max over lookahead entropies.

Per step and row: Gumbels g_y for every token and one rollout seed come from the row's own random
stream; the rollout draws of candidate y are a function of (seed, y) alone, so Ĥ(y) is the same
whichever block or batch evaluated it (this is what makes lazy evaluation provably equal to eager).

Rounds: each round, every unfinished row proposes a block of candidates (first round: sized by
`FirstBlockPolicy`; later rounds: every candidate whose bound still beats the row's best score),
all blocks run through one lookahead (k model calls), and each row's search takes in the results.
Usually one round suffices; the winner's depth-0 logits and cache become the next step's, so the
decode loop makes no call of its own. Within a round `RolloutPruner` stops the rollouts of
candidates that cannot win; their partial terms still tighten their bounds (exact: `lazy.py`).
`RunAheadPolicy` (optional, batch 1) runs the next step's first depths inside this step's calls.

With horizon 1 Ĥ is deterministic, so rows whose whole history is identical (several samples of one
prompt) evaluate each shared candidate once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..chooser import Row, StepResult
from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from ..sampling.kernels import log_softmax
from ..sampling.processors import ProcessorList
from ..sampling.sample import gumbel
from .estimator import CandidateProcessors, Lookahead, lookahead_entropy
from .forked import forked_calls
from .lazy import LazySearch
from .policies import FirstBlockPolicy, RolloutPruner, RowMemory
from .run_ahead import Continuation, RunAheadPolicy
from .calls import tree_calls
from .tree import Branch, branch, merge_branches

TREE_ROOM_CANDIDATES = 32  # the decoding cache keeps room for this many candidates' trees
RowParams = Callable[[Row], tuple[float, ProcessorList]]  # a row's own (alpha, processors)


@dataclass
class _RowSearch:
    """One row's state within one step."""

    search: LazySearch
    seed: int
    group: Any  # rows of one group share candidates' Ĥ (horizon 1, identical histories)
    memory: RowMemory
    first_block: int = 1
    processors: ProcessorList | None = None  # the row's own (the chooser's, unless row_params says)
    given: Continuation | None = None  # what the step before ran ahead for this one
    winner: tuple[np.ndarray, Branch, float] | None = None  # the best's depth-0 logits, cache, h0
    evals: int = 0
    skipped: int = 0  # candidates whose rollouts stopped early (Ĥ not computed in full)
    calls: int = 0
    lookahead_tokens: int = 0
    ahead_tokens: int = 0  # of lookahead_tokens, those run for the next step
    ahead: dict[int, Continuation] = field(default_factory=dict)  # candidate token -> its next step's first depths
    ahead_seeds: dict[int, int] = field(default_factory=dict)  # candidate token -> the rollout seed it assumed


@dataclass
class _Round:
    """One round's requests: candidate i is tokens[i] after row parents[i]; per_row lists each
    row's block and where its candidates sit among the requests."""

    parents: np.ndarray
    tokens: np.ndarray
    per_row: list[tuple[int, np.ndarray, list[int]]]


class EpicChooser:
    """The EPIC chooser (see the module docstring). `run_ahead=False` leaves the core alone.
    `row_params`: each row's own (alpha, processors), for rows of different settings sharing one
    call (the serving engine); by default every row has `alpha` and `processors`."""

    def __init__(self, alpha: float, horizon: int = 4, rollouts: int = 2, processors: ProcessorList | None = None,
                 max_first_block: int = 64, margin: float = 0.5, kv_budget_bytes: int = 1 << 30,
                 prune_slack: float | None = 2.5, run_ahead: bool = True, row_params: RowParams | None = None):
        if horizon < 1 or rollouts < 1:
            raise ValueError("horizon and rollouts must be >= 1")
        self.alpha, self.horizon, self.rollouts = float(alpha), int(horizon), int(rollouts)
        self.processors = processors if processors is not None else ProcessorList()
        self.kv_budget_bytes = kv_budget_bytes
        self.first_block = FirstBlockPolicy(self.horizon, max_first_block, margin)
        self.pruner = RolloutPruner(self.alpha, self.horizon, prune_slack) if prune_slack is not None else None
        self.row_params: RowParams = row_params or (lambda row: (self.alpha, self.processors))
        self.run_ahead = RunAheadPolicy(self.alpha, self.horizon, self.rollouts, self.processors, self.first_block,
                                        self.pruner, self.rollout_uniforms, self.row_params) if run_ahead else None
        # a row's tree holds its candidates and R rollouts of k-1 tokens each (fewer once rollouts stop)
        self.scratch_positions = TREE_ROOM_CANDIDATES * self.tree_tokens
        self.step_log: list[tuple[int, int, int]] | None = None  # set to [] to record (evals, calls, nucleus99)

    @property
    def tree_tokens(self) -> int:
        """Tree tokens of one candidate whose rollouts all run."""
        return 1 + self.rollouts * (self.horizon - 1)

    def rollout_uniforms(self, seed: int, token: int) -> np.ndarray:
        """[R, k-1] draws for candidate `token`, fixed by (row seed, token) alone."""
        if self.horizon == 1:
            return np.zeros((self.rollouts, 0))
        return np.random.default_rng([seed, int(token)]).random((self.rollouts, self.horizon - 1))

    def choose(self, model: CausalLM, rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray,
               cache: KVCache) -> StepResult:
        logq = log_softmax(scores).astype(np.float64)
        states = [self._start(i, r, logq[i]) for i, r in enumerate(rows)]
        rounds = 0
        while (rnd := self._propose(states, first=rounds == 0)) is not None:
            self._evaluate(model, rows, cache, states, rnd, first=rounds == 0)
            rounds += 1
        return self._finish(rows, states, logq)

    __call__ = choose

    def _start(self, i: int, row: Row, logq: np.ndarray) -> _RowSearch:
        """The row's search for this step: its Gumbels and rollout seed from its own stream."""
        if not isinstance(row.chooser_state, RowMemory):
            row.chooser_state = RowMemory()
        memory = row.chooser_state
        alpha, procs = self.row_params(row)
        search = LazySearch(logq, gumbel(row.rng, logq.size), alpha, self.horizon * math.log(logq.size))
        seed = int(row.rng.integers(2**63))
        group = (tuple(row.prompt_ids), tuple(row.generated), id(procs)) if self.horizon == 1 else i
        st = _RowSearch(search, seed, group, memory, self.first_block.size(memory, search),
                        processors=procs)
        if self.run_ahead is not None:
            st.given = self.run_ahead.take(row, memory, search, seed)
        else:
            memory.ahead = None
        return st

    def _propose(self, states: list[_RowSearch], first: bool) -> _Round | None:
        """Every unfinished row's block for this round (the first: its first block, or what was run
        ahead for it), shared candidates requested once. None when no row needs more."""
        requests: dict[Any, int] = {}  # (group, token) -> index among the requests
        parents: list[int] = []
        tokens: list[int] = []
        per_row: list[tuple[int, np.ndarray, list[int]]] = []
        first_of_group: dict[Any, int] = {}  # rows of a group have the same cache: its first row runs them all
        for i, st in enumerate(states):
            owner = first_of_group.setdefault(st.group, i)
            if st.search.done:
                continue
            if first and st.given is not None:
                cands = st.given.tokens
            else:
                # a row with no score yet (its candidates' rollouts all stopped) takes a block by
                # bound again: "every candidate that can still win" would be its whole support
                unscored = st.search.best_token < 0
                cands = st.search.next_block(st.first_block if first or unscored else 0)
            if cands.size == 0:
                continue
            slots = []
            for tok in cands.tolist():
                key = (st.group, tok)
                if key not in requests:
                    requests[key] = len(tokens)
                    parents.append(owner)
                    tokens.append(tok)
                slots.append(requests[key])
            per_row.append((i, cands, slots))
        if not tokens:
            return None
        return _Round(np.asarray(parents, dtype=np.int64), np.asarray(tokens, dtype=np.int64), per_row)

    def _calls(self, model: CausalLM, cache: KVCache, parents: np.ndarray) -> list[np.ndarray]:
        if model.supports_trees:
            return tree_calls(model, cache, parents, self.tree_tokens, self.rollouts)
        return forked_calls(model, cache, parents, self.horizon, self.rollouts, self.kv_budget_bytes)

    def _evaluate(self, model: CausalLM, rows: Sequence[Row], cache: KVCache, states: list[_RowSearch],
                  rnd: _Round, first: bool) -> None:
        """Run the round's candidates through the lookahead, one call after the other, each fed to
        the searches before the next call's pruner looks at them (it stops more rollouts knowing a
        better best)."""
        uniforms = np.stack([self.rollout_uniforms(states[p].seed, t) for p, t in zip(rnd.parents, rnd.tokens)])
        calls = self._calls(model, cache, rnd.parents)
        for idx in calls:
            p_c, t_c = rnd.parents[idx].tolist(), rnd.tokens[idx].tolist()
            given = None
            # only when every row of the call has its run-ahead (rows that join a running batch have
            # none: the call then runs all, else their candidates would stop after depth 0)
            if first and len(calls) == 1 and self.run_ahead is not None and all(
                    states[i].given is not None for i, _, _ in rnd.per_row):
                given = self.run_ahead.given_for_call(rnd.per_row, [st.given for st in states], len(rnd.tokens))
            keep = None if self.pruner is None else self.pruner.keep_for_call(
                [st.memory for st in states], [st.search for st in states], p_c, t_c, first)
            hook = None
            if self.run_ahead is not None and len(set(p_c)) == 1:
                st = states[p_c[0]]
                hook = self.run_ahead.hook(rows[p_c[0]], st.memory, st.search, t_c,
                                           model.eos_token_ids, st.ahead_seeds)
            res = lookahead_entropy(model, cache, p_c, t_c, uniforms[idx], self.horizon, _call_processors(states, p_c),
                                    keep=keep, run_ahead=hook, given=given)
            for run in res.ahead:
                states[p_c[run.candidate]].ahead[t_c[run.candidate]] = run
            self._absorb(states, rnd, idx, res)
            del res

    def _absorb(self, states: list[_RowSearch], rnd: _Round, idx: np.ndarray, res: Lookahead) -> None:
        """Each row's search takes in its candidates of one call: full Ĥ settles a score, partial
        terms tighten a bound (each term left lies in [0, log|V|])."""
        log_v = math.log(res.first_logits.shape[-1])
        pos = np.full(len(rnd.tokens), -1)
        pos[idx] = np.arange(idx.size)
        for i, cands, slots in rnd.per_row:
            here = [(tok, int(pos[j])) for tok, j in zip(cands.tolist(), slots) if pos[j] >= 0]
            if not here:
                continue
            st = states[i]
            toks = np.array([tok for tok, _ in here], dtype=np.int64)
            at = np.array([k for _, k in here], dtype=np.int64)
            full = res.complete[at]
            st.search.update(toks[full], res.entropy[at][full])
            part = at[~full]
            if part.size:
                st.search.tighten(toks[~full], res.lower[part], res.lower[part] + (self.horizon - res.terms[part]) * log_v)
            st.evals += int(full.sum())
            st.skipped += int(part.size)
            ran_ahead = int(res.ahead_tokens[at].sum())  # type: ignore[index]
            st.lookahead_tokens += int(res.candidate_tokens[at].sum()) + ran_ahead
            st.ahead_tokens += ran_ahead
            st.calls += res.calls
            hit = np.flatnonzero(toks == st.search.best_token)
            if hit.size:  # the best can only have changed to a candidate of this call
                k = int(at[hit[0]])
                # keep only the best's state: the call's caches are freed before the next one
                st.winner = (res.first_logits[k].copy(), branch(res.first_cache, k), float(res.first_entropy[k]))

    def _finish(self, rows: Sequence[Row], states: list[_RowSearch], logq: np.ndarray) -> StepResult:
        """The chosen tokens, the state after them, and what the rows remember for their next step."""
        chosen = np.array([st.search.best_token for st in states], dtype=np.int64)
        if self.step_log is not None:
            nucleus = _nucleus_sizes(logq, 0.99)
            self.step_log.extend((st.evals, st.calls, int(n)) for st, n in zip(states, nucleus))
        for r, st, tok in zip(rows, states, chosen.tolist()):
            h_win = st.search.evaluated.get(tok)
            if h_win is not None:
                st.memory.record(h_win, st.winner[2])  # type: ignore[index]
            if self.run_ahead is not None:
                self.run_ahead.keep_for_next(r, st.memory, tok, st.ahead, st.ahead_seeds)
        next_logits = np.stack([st.winner[0] for st in states])  # type: ignore[index]
        next_cache = merge_branches([st.winner[1] for st in states])  # type: ignore[index]
        stats = [{"entropy_evals": st.evals, "rollouts_skipped": st.skipped, "forward_passes": st.calls,
                  "lookahead_tokens": st.lookahead_tokens, "run_ahead_tokens": st.ahead_tokens} for st in states]
        return StepResult(chosen, next_logits, next_cache, stats)


def _call_processors(states: list[_RowSearch], parents: Sequence[int]) -> ProcessorList | CandidateProcessors:
    """The processors of one lookahead call's candidates: their rows' list, or each its own."""
    lists = [states[p].processors for p in parents]
    if all(p is lists[0] for p in lists):
        return lists[0]  # type: ignore[return-value]
    return CandidateProcessors(lists)  # type: ignore[arg-type]


def epic_step(
    model: CausalLM,
    logits: np.ndarray,
    cache: KVCache,
    rngs: Sequence[np.random.Generator],
    alpha: float,
    horizon: int = 4,
    rollouts: int = 2,
    processors: ProcessorList | None = None,
    histories: Sequence[Sequence[int]] | None = None,
) -> StepResult:
    """One EPIC step for rows of a batch, outside the decode loop (to embed or test the sampler).

    logits [rows, V] and cache are the model's state after each row's prefix (e.g. from
    model.prefill); rngs are the rows' random streams. Returns the chosen tokens, their stats
    (entropy_evals, rollouts_skipped, forward_passes, lookahead_tokens, run_ahead_tokens) and the
    logits/cache after those tokens.
    """
    procs = processors if processors is not None else ProcessorList()
    hist = histories if histories is not None else [[] for _ in rngs]
    rows = [Row(0, i, list(h), rng) for i, (h, rng) in enumerate(zip(hist, rngs))]
    # one step: nothing would take up what it ran ahead
    chooser = EpicChooser(alpha, horizon, rollouts, procs, run_ahead=False)
    return chooser.choose(model, rows, logits, procs.apply(logits), cache)


def _nucleus_sizes(logq: np.ndarray, mass: float) -> np.ndarray:
    """Tokens in each row's smallest set holding `mass` of q (what evaluations are compared with)."""
    p = np.sort(np.exp(logq), axis=-1)[:, ::-1]
    return (np.cumsum(p, axis=-1) < mass).sum(axis=-1) + 1
