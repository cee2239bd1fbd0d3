"""EPIC's token chooser: lazy Gumbel-max over lookahead entropies, many rows sharing calls.

Per step and row: Gumbels g_y for every token and one rollout seed come from the row's own random
stream; the rollout draws of candidate y are a function of (seed, y) alone, so Ĥ(y) is the same
whichever block or batch evaluated it (this is what makes lazy evaluation provably equal to eager).

Rounds: each round, every unfinished row proposes a block of candidates (first round: the top
bounds that can win if the winner's Ĥ is near this sample's recent Ĥ; later rounds: every candidate
whose bound still beats the row's best score), all blocks run through one lookahead (k ORT calls),
and rows update their best. Usually one round suffices, so a token costs about k forward passes
(k − 2 when the step before ran it ahead, below), and the winner's depth-0 logits and cache become
the next step's, so no extra decoding call.

Within the first round, depth 0 (one token per candidate) gives Ĥ's first term h0 exactly, which
tightens each bound by a·h0, and each further depth tightens it by its term. Before each depth,
candidates whose tightened bound falls well below the best score this round is expected to reach
(each candidate's bound − a·(terms so far + the sample's recent entropy in the remaining terms))
stop their rollouts. The search stays exact: a stopped candidate keeps its tightened bound and is
taken up again in a later round if the true best turns out not to beat it.

Later rounds stop rollouts only where that is certain: once a candidate's bound, tightened by the
terms computed so far, is no better than the best score already found, it can never win.

Running ahead (token-tree graphs that write in place, one batch row per call): before a row's
last two lookahead depths, the candidate leading on the terms computed so far (the winner in about
nine steps of ten) gets the next step's first block, chosen with the next step's own Gumbels (drawn
from a copy of the row's random stream, which then draws the same numbers at the next step), run as
its children in the call of depth k−2; if it still leads at depth k−1, that block's first rollout
tokens ride in that call. If it wins, the next step's first round starts at depth 2 (or 1): k−2
calls instead of k. The tokens chosen are those without it (up to float rounding, as between any
two block layouts): only which calls compute what changes.

With horizon 1 Ĥ is deterministic, so rows whose whole history is identical (several samples of one
prompt) evaluate each shared candidate once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..decoding import Row, StepResult
from ..runtime.model import CausalLM, KVCache
from ..sampling.processors import ProcessorList, entropy_and_draws, log_softmax
from ..sampling.sample import gumbel
from .lazy import LazySearch
from .lookahead import Branch, Continuation, Given, branch, lookahead_entropy, merge_branches, packing_budget


@dataclass
class _RowSearch:
    search: LazySearch
    seed: int
    group: Any
    winner: tuple[np.ndarray, Branch, float] | None = None  # the best's depth-0 logits, cache, h0
    evals: int = 0
    skipped: int = 0  # candidates whose rollouts stopped early (Ĥ not computed in full)
    calls: int = 0
    lookahead_tokens: int = 0
    ahead_tokens: int = 0  # of lookahead_tokens, those run for the next step
    ahead: dict[int, Continuation] = field(default_factory=dict)  # candidate token -> the next step's first depths
    ahead_seeds: dict[int, int] = field(default_factory=dict)  # candidate token -> the rollout seed it assumed


@dataclass
class _Ahead:
    """A row's next step's first depths, run ahead after the token it chose."""

    row: Row  # the row it belongs to (the same object at the next step)
    length: int  # len(row.generated) before that token
    token: int
    run: Continuation
    seed: int  # the next step's rollout seed it assumed (its draws are those of that seed)


# most tokens one request to run ahead adds to a call. A wide tree makes every token dearer and its
# winner less certain, so a wide request costs more than the calls it saves when its guess misses.
# A next step expected to need up to twice this many candidates runs its top ones ahead (its first
# block is then those), one expected to need more runs nothing ahead. SmolLM2, batch 1, 6 prompts ×
# 20 tokens, ms per token against not running ahead: a = 0.2: -20%; a = 0.5: ±0; a = 0.04 (its
# calibrated alpha): -34%. Skipping every step that needs over 32 instead: -13% at a = 0.2; a cap of 64:
# -15% at a = 0.2 but +10% at a = 0.5.
AHEAD_TOKENS = 32
MIN_TREE_CANDIDATES = 8  # cache room below this many candidates' trees is not room kept for trees


class EpicChooser:
    def __init__(self, alpha: float, horizon: int = 4, rollouts: int = 2, processors: ProcessorList | None = None,
                 max_first_block: int = 64, margin: float = 0.5, kv_budget_bytes: int = 1 << 30,
                 prune_slack: float | None = 2.5, run_ahead: bool = True):
        if horizon < 1 or rollouts < 1:
            raise ValueError("horizon and rollouts must be >= 1")
        self.alpha = float(alpha)
        self.horizon = int(horizon)
        self.rollouts = int(rollouts)
        self.processors = processors if processors is not None else ProcessorList()
        self.max_first_block = max_first_block
        self.margin = margin
        self.kv_budget_bytes = kv_budget_bytes
        self.prune_slack = prune_slack  # nats of rollout entropy the expected best may be off by; None: never skip
        self.run_ahead = run_ahead  # run the likely winner's next step's first depths in this step's last calls
        self._ahead: dict[int, _Ahead] = {}  # id(row) -> its next step's first depths, run ahead
        # room the decoding cache keeps for the lookahead's token trees (graphs that write in place):
        # a row's tree holds its candidates and R rollouts of k-1 tokens each (fewer once rollouts
        # stop); 32 candidates covers nearly all steps, and a bigger tree grows the cache once
        self.cache_scratch = 32 * (1 + self.rollouts * (self.horizon - 1))
        self.step_log: list[tuple[int, int, int]] | None = None  # set to [] to record (evals, calls, nucleus99)
        self._h_recent: dict[tuple[int, int], float] = {}  # per sample: EMA of its winners' Ĥ
        self._rest_recent: dict[tuple[int, int], float] = {}  # per sample: EMA of its winners' Ĥ − h0

    def _first_block(self, row: Row, search: LazySearch) -> int:
        """Size the first block from this step's bounds and the Ĥ this sample's winners recently had."""
        return max(1, min(self.max_first_block, self._predicted_need(row, search)))

    def _predicted_need(self, row: Row, search: LazySearch) -> int:
        key = (row.prompt_index, row.sample_index)
        h_guess = self._h_recent.get(key)
        if h_guess is None:  # first step of a sample: what other samples saw, else a middling guess
            h_guess = float(np.mean(list(self._h_recent.values()))) if self._h_recent else self.horizon * 2.0
        return search.predicted_need(h_guess, self.margin)

    def rollout_uniforms(self, seed: int, token: int) -> np.ndarray:
        """[R, k-1] draws for candidate `token`, fixed by (row seed, token) alone."""
        if self.horizon == 1:
            return np.zeros((self.rollouts, 0))
        return np.random.default_rng([seed, int(token)]).random((self.rollouts, self.horizon - 1))

    def __call__(self, model: CausalLM, rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray,
                 cache: KVCache) -> StepResult:
        vocab = scores.shape[-1]
        h_max = self.horizon * math.log(vocab)
        logq = log_softmax(scores).astype(np.float64)
        states = []
        for i, r in enumerate(rows):
            g = gumbel(r.rng, vocab)
            seed = int(r.rng.integers(2**63))
            group = (tuple(r.prompt_ids), tuple(r.generated)) if self.horizon == 1 else i
            states.append(_RowSearch(LazySearch(logq[i], g, self.alpha, h_max), seed, group))

        ahead, self._ahead = self._ahead, {}
        given = [self._given(r, st, ahead.get(id(r))) for r, st in zip(rows, states)]
        rounds = 0
        first_blocks = [self._first_block(r, st.search) for r, st in zip(rows, states)]
        while True:
            requests: dict[Any, int] = {}  # (group, token) -> index in this round
            parents: list[int] = []
            tokens: list[int] = []
            per_row: list[tuple[int, np.ndarray, list[int]]] = []
            for i, st in enumerate(states):
                if st.search.done:
                    continue
                if rounds == 0 and given[i] is not None:
                    cands = given[i].tokens  # type: ignore[union-attr]
                else:
                    cands = st.search.next_block(first_blocks[i] if rounds == 0 else 0)
                if cands.size == 0:
                    continue
                slots = []
                for tok in cands.tolist():
                    key = (st.group, tok)
                    if key not in requests:
                        requests[key] = len(tokens)
                        parents.append(i)
                        tokens.append(tok)
                    slots.append(requests[key])
                per_row.append((i, cands, slots))
            if not tokens:
                break
            uniforms = np.stack([self.rollout_uniforms(states[p].seed, t) for p, t in zip(parents, tokens)])
            log_v = math.log(vocab)
            parents_a, tokens_a = np.asarray(parents), np.asarray(tokens)
            chunks = self._chunks(model, cache, parents)
            for idx in chunks:
                # one call after the other, each fed to the searches before the next call's
                # pruner looks at them (it stops more rollouts knowing a better best)
                p_c, t_c = parents_a[idx].tolist(), tokens_a[idx].tolist()
                pre = None
                if rounds == 0 and len(chunks) == 1 and any(given[i] is not None for i, _, _ in per_row):
                    pre = self._given_for_call(per_row, given, len(tokens))
                res = lookahead_entropy(model, cache, p_c, t_c, uniforms[idx], self.horizon, self.processors,
                                        keep=self._pruner(rows, states, p_c, t_c, expected=rounds == 0),
                                        run_ahead=self._ahead_asker(rows, states, p_c, t_c, model.eos_token_ids)
                                        if self.run_ahead else None,
                                        given=pre)
                for run in res.ahead:
                    states[p_c[run.candidate]].ahead[t_c[run.candidate]] = run
                pos = np.full(len(tokens), -1)
                pos[idx] = np.arange(idx.size)
                for i, cands, slots in per_row:
                    here = [(tok, int(pos[j])) for tok, j in zip(cands.tolist(), slots) if pos[j] >= 0]
                    if not here:
                        continue
                    st = states[i]
                    toks = np.array([tok for tok, _ in here], dtype=np.int64)
                    at = np.array([k for _, k in here], dtype=np.int64)
                    full = res.complete[at]
                    st.search.update(toks[full], res.entropy[at][full])
                    part = at[~full]
                    if part.size:  # Ĥ = computed terms + the rest, each rest term in [0, log|V|]
                        st.search.tighten(toks[~full], res.lower[part],
                                          res.lower[part] + (self.horizon - res.terms[part]) * log_v)
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
                del res
            rounds += 1

        chosen = np.array([st.search.best_token for st in states], dtype=np.int64)
        if self.step_log is not None:
            nucleus = _nucleus_sizes(logq, 0.99)
            self.step_log.extend((st.evals, st.calls, int(n)) for st, n in zip(states, nucleus))
        for r, st in zip(rows, states):
            key = (r.prompt_index, r.sample_index)
            h_win = st.search.evaluated.get(st.search.best_token)
            if h_win is not None:
                self._h_recent[key] = 0.5 * self._h_recent.get(key, h_win) + 0.5 * h_win
                rest = h_win - st.winner[2]  # type: ignore[index]
                self._rest_recent[key] = 0.5 * self._rest_recent.get(key, rest) + 0.5 * rest
        for r, st, tok in zip(rows, states, chosen.tolist()):
            if tok in st.ahead:
                self._ahead[id(r)] = _Ahead(r, len(r.generated), tok, st.ahead[tok], st.ahead_seeds[tok])
        next_logits = np.stack([st.winner[0] for st in states])  # type: ignore[index]
        next_cache = merge_branches([st.winner[1] for st in states])  # type: ignore[index]
        stats = [{"entropy_evals": st.evals, "rollouts_skipped": st.skipped, "forward_passes": st.calls,
                  "lookahead_tokens": st.lookahead_tokens, "run_ahead_tokens": st.ahead_tokens} for st in states]
        return StepResult(chosen, next_logits, next_cache, stats)

    def _given(self, row: Row, st: _RowSearch, ahead: _Ahead | None) -> Continuation | None:
        """What the last step ran ahead after the token it chose, if this step's row and random
        draws are the ones it assumed and every one of its tokens can still be sampled (else the
        step runs all itself)."""
        if ahead is None or ahead.row is not row or len(row.generated) != ahead.length + 1 \
                or row.generated[-1] != ahead.token or ahead.seed != st.seed:
            return None
        run = ahead.run
        if not np.isfinite(st.search.bound[run.tokens]).all():
            return None
        return run

    def _given_for_call(self, per_row: list[tuple[int, np.ndarray, list[int]]], given: list[Continuation | None],
                        n: int) -> Given:
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

    def _ahead_asker(self, rows: Sequence[Row], states: list[_RowSearch], parents: list[int], tokens: list[int],
                     eos_ids: Any) -> Any:
        """`run_ahead` for one lookahead call. Before each of its last two depths, the candidate
        leading on the terms of Ĥ computed so far gets the next step's first block (sized as
        `_first_block` sizes it but at most AHEAD_TOKENS, under the next step's Gumbels: a copy of
        the row's stream draws them); if it still leads at the last depth, that block's first
        rollout tokens too, for the candidates the first round's pruner would let go on (under the
        next step's rollout draws). Nothing where the best so far comes from an earlier call (its
        tree is gone), the leader is an end-of-sequence token, or the next step would need over
        2·AHEAD_TOKENS candidates.

        Only calls of one batch row run ahead. With several, calls are wide, so a call saved costs
        little more than its tokens, and every row's tree is padded to the widest: measured on
        SmolLM2 (a = 0.2, 6 prompts, 20 tokens, depth 0 only), per token 10% faster at batch 1,
        1.5% at batch 2, 5% and 11% slower at batch 4 and 8."""
        par = np.asarray(parents)
        if np.unique(par).size > 1:
            return None
        row, st = rows[int(par[0])], states[int(par[0])]
        toks = np.asarray(tokens, dtype=np.int64)
        eos = np.array(sorted(int(t) for t in eos_ids), dtype=np.int64)
        plans: dict[int, tuple[LazySearch, int]] = {}  # candidate -> the next step's search and rollout seed

        def ask(idx: np.ndarray, lower: np.ndarray, logits0: np.ndarray, runs: list[Continuation]) -> Any:
            partial = st.search.bound[toks[idx]] - self.alpha * lower
            lead = int(idx[int(np.argmax(partial))])
            if toks[lead] in eos or (st.search.best_token >= 0 and st.search.best_score >= partial.max()):
                return [], []
            run = next((r for r in runs if r.candidate == lead), None)
            if run is None:
                search, seed = self._next_search(row, logits0[lead])
                plans[lead] = (search, seed)
                st.ahead_seeds[int(toks[lead])] = seed
                need = self._predicted_need(row, search)
                if need > 2 * AHEAD_TOKENS:
                    return [], []
                block = search.next_block(max(1, min(need, AHEAD_TOKENS)))
                return ([(lead, block)] if block.size else []), []
            if run.went_on is not None:
                return [], []
            search, seed = plans[lead]
            scores = self.processors(np.zeros((run.tokens.size, 0), dtype=np.int64), run.logits) \
                if len(self.processors) else run.logits
            u = np.stack([self.rollout_uniforms(seed, t)[:, 0] for t in run.tokens.tolist()])
            run.entropy, run.draws = entropy_and_draws(scores, u)  # the next step takes them as they are
            h0 = np.where(np.isin(run.tokens, eos), 0.0, run.entropy)
            go = np.ones(run.tokens.size, dtype=bool)
            if self.prune_slack is not None and self.alpha != 0:
                go = self._goes_on(search, row, run.tokens, h0, 1, expected=True)
            return ([], [(run, go, run.draws[go])]) if 0 < go.sum() * self.rollouts <= AHEAD_TOKENS else ([], [])

        return ask

    def _next_search(self, row: Row, logits: np.ndarray) -> tuple[LazySearch, int]:
        """The search and rollout seed the row's next step will have if `logits` are its next
        logits: the Gumbels and seed come from a copy of the row's stream, which draws the same
        numbers at the next step."""
        scores = logits[None]
        if len(self.processors):
            scores = self.processors(np.zeros((1, 0), dtype=np.int64), scores)
        logq = log_softmax(scores)[0].astype(np.float64)
        stream = np.random.Generator(type(row.rng.bit_generator)())
        stream.bit_generator.state = row.rng.bit_generator.state
        g = gumbel(stream, logq.size)
        seed = int(stream.integers(2**63))
        return LazySearch(logq, g, self.alpha, self.horizon * math.log(logq.size)), seed

    def _pruner(self, rows: Sequence[Row], states: list[_RowSearch], parents: list[int], tokens: list[int],
                expected: bool) -> Any:
        """`keep` for one lookahead call. Before each further depth, a candidate goes on if its
        bound, tightened by the terms of Ĥ computed so far, beats its row's best score found so far
        (else it can never win) and, in the first round (`expected`), is within a·prune_slack of the
        best score the row is expected to reach: the best, over this call's candidates of the row,
        of bound − a·(terms so far + the sample's recent entropy in the remaining terms). Later
        rounds hold candidates that may be needed, so only the first test applies there."""
        if self.prune_slack is None or self.horizon == 1 or self.alpha == 0:
            return None
        par = np.asarray(parents)
        toks = np.asarray(tokens, dtype=np.int64)

        def keep(idx: np.ndarray, lower: np.ndarray, terms: int) -> np.ndarray:
            mask = np.ones(idx.size, dtype=bool)
            for i in np.unique(par[idx]).tolist():
                at = np.flatnonzero(par[idx] == i)
                mask[at] = self._goes_on(states[i].search, rows[i], toks[idx[at]], lower[at], terms, expected)
            return mask

        return keep

    def _goes_on(self, search: LazySearch, row: Row, tokens: np.ndarray, lower: np.ndarray, terms: int,
                 expected: bool) -> np.ndarray:
        """The pruner's rule for one row's candidates (see `_pruner`)."""
        rest_max = (self.horizon - terms) * math.log(len(search.bound))
        upper = search.upper_bound(tokens, lower, lower + rest_max)
        target = search.best_score
        if expected:
            rest = self._expected_rest(row, lower, terms, rest_max)
            reach = search.bound[tokens] - self.alpha * (lower + rest)
            target = max(target, float(reach.max()) - abs(self.alpha) * self.prune_slack)  # type: ignore[operator]
        return upper > target

    def _expected_rest(self, row: Row, lower: np.ndarray, terms: int, rest_max: float) -> float:
        """The entropy a candidate of `row` may still add after `terms` terms: this sample's recent
        winners' Ĥ − h0, scaled to the terms left (a sample's first step: other samples' figure,
        else later depths like the ones computed)."""
        k = self.horizon
        rest = self._rest_recent.get((row.prompt_index, row.sample_index))
        if rest is None:
            others = list(self._rest_recent.values())
            rest = float(np.mean(others)) if others else (k - 1) * float(np.median(lower / terms))
        return min(max(rest * (k - terms) / (k - 1), 0.0), rest_max)

    def _chunks(self, model: CausalLM, cache: KVCache, parents: list[int]) -> list[np.ndarray]:
        """Split a round's candidates (indices, ascending) into lookahead calls.

        Forked rows (graphs without token trees): calls whose forked KV cache stays within
        `kv_budget_bytes`, cut between batch rows where possible so that a row usually takes part
        in one call per depth; long prefixes mean fewer candidates per call.
        Token trees do not copy the prefix per candidate: one call. Except on graphs that write in
        place when the rows' prefixes are too long to copy (see `packing_budget`): the trees then run in
        the decoding cache's own room, and a row whose tree could outgrow it spreads its
        candidates over calls, the first so many of every row in the first call, and so on
        (growing the cache instead would hold two copies of it for a moment)."""
        n = len(parents)
        if model.supports_trees:
            per_candidate = 1 + self.rollouts * (self.horizon - 1)  # tree tokens, no rollout stopped
            fits = (cache.capacity - cache.length) // per_candidate
            p = np.asarray(parents)
            if not model.kv_in_place or fits < MIN_TREE_CANDIDATES or \
                    np.unique(p).size * cache.length <= packing_budget(model, p):  # packing may copy them
                return [np.arange(n)]
            rank = np.empty(n, dtype=np.int64)  # each candidate's place among its row's
            for row in np.unique(p):
                members = np.flatnonzero(p == row)
                rank[members] = np.arange(members.size)
            call = rank // fits
            return [np.flatnonzero(call == c) for c in range(int(call.max()) + 1)]
        layers, heads, dim = model.spec.num_layers, model.spec.num_kv_heads, model.spec.head_dim
        itemsize = np.dtype(model.spec.kv_dtype).itemsize
        per_row = 2 * layers * 2 * heads * dim * itemsize * (cache.length + self.horizon)  # past + present
        cap = max(1, int(self.kv_budget_bytes // (per_row * self.rollouts)))
        starts = [0]
        count = 0
        for j in range(1, n + 1):
            count += 1
            row_ends = j == n or parents[j] != parents[j - 1]
            if j < n and (count >= cap or (row_ends and count + _run_length(parents, j) > cap)):
                starts.append(j)
                count = 0
        return [np.arange(lo, hi) for lo, hi in zip(starts, starts[1:] + [n])]


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
    (entropy_evals, rollouts_skipped, forward_passes, lookahead_tokens, run_ahead_tokens) and the logits/cache
    after those tokens.
    """
    procs = processors if processors is not None else ProcessorList()
    scores = procs(np.zeros((len(rngs), 0), dtype=np.int64), logits) if len(procs) else logits
    hist = histories if histories is not None else [[] for _ in rngs]
    rows = [Row(0, i, list(h), rng) for i, (h, rng) in enumerate(zip(hist, rngs))]
    # one step: nothing would take up what it ran ahead
    return EpicChooser(alpha, horizon, rollouts, procs, run_ahead=False)(model, rows, logits, scores, cache)


def _run_length(parents: list[int], j: int) -> int:
    """How many consecutive candidates from position j share parents[j]."""
    n = 1
    while j + n < len(parents) and parents[j + n] == parents[j]:
        n += 1
    return n


def _nucleus_sizes(logq: np.ndarray, mass: float) -> np.ndarray:
    """Tokens in each row's smallest set holding `mass` of q (what evaluations are compared with)."""
    p = np.sort(np.exp(logq), axis=-1)[:, ::-1]
    return (np.cumsum(p, axis=-1) < mass).sum(axis=-1) + 1
