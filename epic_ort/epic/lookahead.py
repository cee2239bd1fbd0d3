"""Rao-Blackwellized lookahead entropy Ĥ(y) for many candidates at once.

    Ĥ(y) = (1/R) Σ_r Σ_{j<k} Entropy(q(· | x, y, rollout_r[:j]))

All candidates of a block (from any rows of the batch) run together: depth 0 feeds the candidates
(R copies would compute the same thing, so it runs once per candidate), then R rollouts per
candidate, and each further depth is one ORT call. The prefix is never re-run. Depth 0's logits and
cache are returned so the chosen candidate's next decoding step costs nothing.

Two ways to lay the rows out, by what the graph can do:
- a token tree (`model.supports_trees`, the lean export): the candidates, then the rollouts, are
  positions of one model row per batch row, over that row's prefix cache; a tree mask lets each
  token see the prefix and its own ancestors only. The prefix is not duplicated per candidate.
  On graphs that write the cache in place the trees are scratch in the room after the decoding
  cache itself (nothing copied) unless grouping short rows' prefixes into shared units, which
  copies them, is both cheaper and within `COPY_BUDGET_BYTES`.
- forked rows (any other graph): the prefix cache is gathered once to the candidate rows, then
  tiled to R rows per candidate.

Rollout randomness comes from per-candidate uniforms supplied by the caller, so Ĥ(y) does not
depend on which other candidates shared the call.

Depth 0 already gives Ĥ's first term exactly, and each further depth adds one term. Before each
further depth a caller-supplied `keep` looks at the terms computed so far and says which candidates
go on (R rows each per depth): the sampler stops those that can no longer win, at no extra ORT call.

Running the next step ahead (token trees on graphs that write in place): a next step's candidates
are children of this step's winner, i.e. tree nodes at depth 1 under it, and their first rollout
tokens nodes at depth 2. Before each of the last two depths a caller-supplied `run_ahead` may name,
for the candidate most likely to win, the next step's first candidates (then, at the last depth,
their first rollout tokens); they ride along in calls that run anyway, and their logits and
key/value columns come back as `Continuation`s. If that candidate wins, the next step passes them
back as `given` and skips the calls for those depths: k−2 calls per token instead of k. What is
computed is the same either way (the same tokens at the same positions over the same keys), up to
float rounding from the calls' different shapes, so this changes cost only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..runtime.model import BufferWrites, CausalLM, KVCache, as_numpy, cache_buffers, growth_headroom
from ..sampling.processors import ProcessorList, entropy_and_draws


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
    calls: int  # ORT calls made
    ahead: list["Continuation"] = field(default_factory=list)  # the next step's first depths, run ahead
    ahead_tokens: np.ndarray | None = None  # [n] tokens run ahead after each candidate (not in candidate_tokens)


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
    """Depths of this lookahead's candidates already run (by an earlier step's `run_ahead`), in
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


Keep = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
# run_ahead(idx, lower, logits0, runs) -> (first blocks [(candidate, tokens)], rollouts [(run, go, tokens [g, R])])
RunAhead = Callable[[np.ndarray, np.ndarray, np.ndarray, list[Continuation]],
                    tuple[list[tuple[int, np.ndarray]], list[tuple[Continuation, np.ndarray, np.ndarray]]]]


def lookahead_entropy(
    model: CausalLM,
    cache: KVCache,
    parents: Sequence[int],
    candidates: Sequence[int],
    uniforms: np.ndarray,
    horizon: int,
    processors: ProcessorList | None = None,
    keep: Keep | None = None,
    run_ahead: RunAhead | None = None,
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
    of their tokens go on and the R first rollout tokens of each (see the module docstring). Used
    where `can_run_ahead(model)`.
    given: the depths an earlier lookahead ran ahead for these candidates; the rest runs as usual.
    Ignored (all run) where it cannot be used.
    """
    parents = np.asarray(parents, dtype=np.int64)
    cands = np.asarray(candidates, dtype=np.int64)
    n = cands.size
    eos = np.array(sorted(model.eos_token_ids), dtype=np.int64)
    procs = processors if processors is not None and len(processors) else None
    no_ids = np.zeros((n, 0), dtype=np.int64)

    rows: _TreeRows | _ForkedRows = (_TreeRows(model, cache, parents, uniforms.shape[1], horizon)
                                     if model.supports_trees else _ForkedRows(model, horizon))
    ahead_ok = can_run_ahead(model)
    given = given if ahead_ok else None
    logits0, first_cache = rows.first(cache, parents, cands, given)
    scores0 = procs(no_ids, logits0) if procs else logits0
    alive0 = ~np.isin(cands, eos)
    room = model.max_positions - int(cache.next_position[parents].max() + 1)
    depth = min(horizon, room + 1)
    h0, draws0 = _first_terms(scores0, uniforms[:, :, 0] if depth > 1 else None, given)  # draws0 [n, R]
    h0 = np.where(alive0, h0, 0.0)
    lower = h0.copy()
    terms = np.ones(n, dtype=np.int64)
    cand_tokens = np.zeros(n, dtype=np.int64)
    cand_tokens[rows.ran_first] = 1  # depth 0 run in this call (not given)
    ahead: list[Continuation] = []
    ahead_tokens = np.zeros(n, dtype=np.int64)

    active = np.arange(n)
    if depth > 1 and keep is not None:
        active = active[np.asarray(keep(active, lower, 1), dtype=bool)]
    placed = _given_rollouts(given, draws0) if depth > 1 else None  # given: token trees only
    if placed is not None:  # what was run ahead goes on (the rest stops: a later round resumes it if need be)
        active = active[given.went_on[active]]  # type: ignore[union-attr]
    if depth > 1 and active.size:
        rollouts = uniforms.shape[1]
        tile = np.repeat(active, rollouts)
        rows.start_rollouts(tile)
        z = draws0[active].reshape(-1)
        alive = alive0[tile]
        acc = np.zeros(tile.size, dtype=np.float64)
        u = uniforms[active].reshape(tile.size, -1)
        for j in range(1, depth):
            alive &= ~np.isin(z, eos)
            if j == 1 and placed is not None:
                logits_j = rows.place_rollouts(z, *placed(active))  # type: ignore[union-attr]
            else:
                firsts, extend = ([], [])
                if ahead_ok and run_ahead is not None and depth == horizon and depth - 2 <= j and room >= 2:
                    firsts, extend = run_ahead(active, lower[active], logits0, ahead)
                if firsts or extend:
                    logits_j, ran = rows.step_ahead(z, j, firsts, extend)  # type: ignore[union-attr]
                    ahead.extend(ran)
                    for run in ran:
                        ahead_tokens[run.candidate] += run.tokens.size
                    for run, _, tokens in extend:
                        ahead_tokens[run.candidate] += tokens.size
                else:
                    logits_j = rows.step(z, j)
                cand_tokens[active] += rollouts
            scores_j = procs(np.zeros((tile.size, 0), dtype=np.int64), logits_j) if procs else logits_j
            h_j, draws = entropy_and_draws(scores_j, u[:, j] if j + 1 < depth else None)
            acc += np.where(alive, h_j, 0.0)
            lower[active] = h0[active] + acc.reshape(active.size, rollouts).mean(axis=1)
            terms[active] = j + 1
            if j + 1 < depth:
                z = draws[:, 0]  # type: ignore[index]
            if j + 1 < depth and keep is not None:
                go = np.asarray(keep(active, lower[active], j + 1), dtype=bool)
                if not go.all():
                    rows_go = np.repeat(go, rollouts)
                    active, tile = active[go], tile[rows_go]
                    if not active.size:
                        break
                    rows.keep(rows_go)
                    z, alive, acc, u = z[rows_go], alive[rows_go], acc[rows_go], u[rows_go]
    complete = terms >= depth
    h = np.where(complete, lower, np.nan)
    return Lookahead(h, h0, complete, lower, terms, cand_tokens, logits0, first_cache, rows.calls, ahead, ahead_tokens)


def _first_terms(scores0: np.ndarray, uniforms: np.ndarray | None, given: Given | None
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


def _given_rollouts(given: Given | None, draws0: np.ndarray
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


def can_run_ahead(model: CausalLM) -> bool:
    """Whether `run_ahead`/`given` apply: token trees written in place, into NumPy buffers."""
    return model.supports_trees and model.kv_in_place


MAX_UNIT_TOKENS = 256  # tree tokens of one unit in one call (rotary tables also cap it at max_positions)
KEYS_PER_TOKEN = 2000  # rough cost model: attending to this many keys costs about one token through the weights
COPY_BUDGET_BYTES = 64 << 20  # in-place graphs: most cache a packed layout may copy (else rows layout)


class _ForkedRows:
    """One model row per candidate, then per rollout: the prefix cache is gathered to them."""

    def __init__(self, model: CausalLM, horizon: int):
        self.model, self.calls, self.horizon = model, 0, horizon
        self.cache0: KVCache | None = None
        self.cache_r: KVCache | None = None

    def first(self, cache: KVCache, parents: np.ndarray, cands: np.ndarray, given: Given | None = None
              ) -> tuple[np.ndarray, KVCache]:
        room = self.horizon if self.model.kv_in_place else 0
        logits0, self.cache0 = self.model.step(cands, cache.select(parents, room=room))  # freed on return
        self.calls += 1
        self.ran_first = np.arange(cands.size)
        return logits0, self.cache0

    def start_rollouts(self, tile: np.ndarray) -> None:
        self.cache_r = self.cache0.select(tile)  # type: ignore[union-attr]

    def step(self, tokens: np.ndarray, depth: int) -> np.ndarray:
        logits, self.cache_r = self.model.step(tokens, self.cache_r)  # type: ignore[arg-type]
        self.calls += 1
        return logits

    def keep(self, mask: np.ndarray) -> None:
        self.cache_r = self.cache_r.select(np.flatnonzero(mask))  # type: ignore[union-attr]


class _TreeRows:
    """Candidates and rollouts as token trees over their prefixes. A unit is one model row: the
    prefixes of one or a few batch rows side by side (a few when their trees are small, so that
    units are about equally wide: narrower ones are padded) followed by their tree tokens. Each
    token sees its own prefix, its ancestors and itself; all else is masked out."""

    def __init__(self, model: CausalLM, cache: KVCache, parents: np.ndarray, rollouts: int, horizon: int):
        self.model, self.calls = model, 0
        cap = max(1, min(MAX_UNIT_TOKENS, model.max_positions) // max(rollouts, 1))
        tree_keys = lambda width: width * (1 + rollouts * (horizon - 1)) / 2  # noqa: E731 (mean tree size)
        copy_slots = packing_budget(model, parents) if model.kv_in_place else None
        self.cand_unit, self.cand_block, self.unit_parents = _pack_units(
            parents, cache.length, cap, tree_keys, cache.rows if model.kv_in_place else 0, copy_slots)
        self.parents, self.prefix_len = parents, cache.length
        self.prefix_next = cache.next_position
        self.blocks = self.unit_parents.shape[1]
        self.prefix = cache
        widest = int(np.bincount(self.cand_unit).max())  # depth 0's width; later depths make room as they go
        self.cache, self.in_prefix = _unit_cache(cache, self.unit_parents, widest if model.kv_in_place else 0)
        self.cand_key: np.ndarray | None = None  # each candidate's key column in its unit (after depth 0)
        self.row_cand: np.ndarray | None = None  # rollout rows: their candidate, and the key columns
        self.row_path: np.ndarray | None = None  # of their tree ancestors

    def _run(self, tokens: np.ndarray, cand: np.ndarray, depth: int | np.ndarray, ancestors: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per entry of `cand` (the candidate each belongs to), at tree depth
        `depth` (one for all, or one per token); return their logits and key columns.
        `ancestors` [tokens, d]: tree key columns each token also sees, besides its prefix and itself."""
        units, unit = int(self.unit_parents.shape[0]), self.cand_unit[cand]
        col = _slot_in_unit(unit, units)
        width, past, span = int(col.max()) + 1, self.cache.length, self.blocks * self.prefix_len
        ids = np.zeros((units, width), dtype=np.int64)
        ids[unit, col] = tokens
        real = np.zeros((units, width), dtype=np.int64)
        real[unit, col] = 1
        positions = np.zeros((units, width), dtype=np.int64)
        positions[unit, col] = self.prefix_next[self.parents[cand]] + depth
        sees_block = np.zeros((units, width, self.blocks), dtype=bool)
        sees_block[unit, col, self.cand_block[cand]] = True
        tree = np.zeros((units, width, past + width), dtype=bool)
        tree[:, :, :span] = np.repeat(sees_block, self.prefix_len, axis=2)
        tree[unit, col, past + col] = True
        if ancestors is not None:
            for a in range(ancestors.shape[1]):
                tree[unit, col, ancestors[:, a]] = True
        self._make_room(width)
        logits, self.cache = self.model.forward(ids, self.cache, real, positions=positions, tree_mask=tree,
                                                logits_at=(unit, col), scratch=True)
        self.calls += 1
        return logits, past + col

    def _make_room(self, width: int) -> None:
        """Room for `width` more tree tokens: a tree in the decoding cache's own room grows that
        cache itself, tree so far included, so later steps find the room."""
        past = self.cache.length
        if self.in_prefix and self.cache.capacity < past + width:
            self.prefix.reserve(width, headroom=growth_headroom(past, width), used=past)
            self.cache = _rows(self.prefix, int(self.unit_parents[0, 0]), int(self.unit_parents.shape[0]),
                               self.cache.attention_mask, self.cache.next_position)

    def _place(self, cand: np.ndarray, columns: Sequence[np.ndarray]) -> np.ndarray | None:
        """Write candidates `cand`'s depth-0 key/value columns (run ahead by an earlier call) into
        the tree, after what it holds, as `_run` would have; their key columns, or None where the
        tree's cache is not ours to write (the caller then runs them)."""
        units, unit = int(self.unit_parents.shape[0]), self.cand_unit[cand]
        col = _slot_in_unit(unit, units)
        width = int(col.max()) + 1
        self._make_room(width)
        c, past = self.cache, self.cache.length
        if c.writes is None or not c.room_is_free or c.capacity < past + width or \
                not all(isinstance(v, np.ndarray) for v in c.values):
            return None
        padded = cand.size < units * width  # narrower units: slots no token fills, masked but must be finite
        for v, x in zip(c.values, columns):
            if padded:
                v[:, :, past:past + width] = 0
            v[unit, :, past + col] = x
        real = np.zeros((units, width), dtype=np.int64)
        real[unit, col] = 1
        c.writes.end, c.writes.scratch = past + width, True
        self.cache = KVCache(values=c.values, attention_mask=np.concatenate([c.attention_mask, real], axis=1),
                             next_position=c.next_position + real.sum(axis=1), writes=c.writes)
        return past + col

    def first(self, cache: KVCache, parents: np.ndarray, cands: np.ndarray, given: Given | None = None
              ) -> tuple[np.ndarray, "TreeBranches"]:
        """Depth 0: run the candidates, except those `given` has (placed in the tree instead)."""
        have = np.zeros(cands.size, dtype=bool) if given is None else given.have
        keys = np.empty(cands.size, dtype=np.int64)
        logits0: np.ndarray | None = None
        run = np.flatnonzero(~have)
        if have.any():
            placed = self._place(np.flatnonzero(have), given.columns)  # type: ignore[union-attr]
            if placed is None:
                run = np.arange(cands.size)
            else:
                keys[have] = placed
                logits0 = np.empty((cands.size, given.logits.shape[1]), dtype=given.logits.dtype)  # type: ignore[union-attr]
                logits0[have] = given.logits  # type: ignore[union-attr]
        if run.size:
            out, keys[run] = self._run(cands[run], run, 0, None)
            if logits0 is None:
                logits0 = out
            else:
                logits0[run] = out
        self.cand_key = keys
        self.ran_first = run
        return logits0, TreeBranches(cache, parents, self.cache, self.cand_unit, keys)  # type: ignore[arg-type]

    def start_rollouts(self, tile: np.ndarray) -> None:
        self.row_cand = tile
        self.row_path = self.cand_key[tile][:, None]  # type: ignore[index]

    def step(self, tokens: np.ndarray, depth: int) -> np.ndarray:
        logits, keys = self._run(tokens, self.row_cand, depth, self.row_path)  # type: ignore[arg-type]
        self.row_path = np.concatenate([self.row_path, keys[:, None]], axis=1)  # type: ignore[list-item]
        return logits

    def place_rollouts(self, z: np.ndarray, logits: np.ndarray, columns: Sequence[np.ndarray]) -> np.ndarray:
        """Depth 1 of the rollouts, run ahead by an earlier call: their columns go into the tree
        (or, where the tree's cache is not ours to write, they run). Returns their logits."""
        keys = self._place(self.row_cand, columns)  # type: ignore[arg-type]
        if keys is None:
            return self.step(z, 1)
        self.row_path = np.concatenate([self.row_path, keys[:, None]], axis=1)  # type: ignore[list-item]
        return logits

    def step_ahead(self, tokens: np.ndarray, depth: int, firsts: list[tuple[int, np.ndarray]],
                   extend: list[tuple[Continuation, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, list[Continuation]]:
        """`step`, with the next step's tokens riding along: `firsts`, a next step's candidates as
        children of a candidate (tree depth 1: they see the prefix, that candidate and themselves);
        `extend`, the first rollout tokens of continuations run at the depth before (depth 2 under
        their candidate, after their next-step candidate), which are filled in. Returns the
        rollouts' logits and the new continuations (their columns are copies: the tree is scratch)."""
        n, path = tokens.size, self.row_path
        ids, cand, depths = [tokens], [self.row_cand], [np.full(n, depth, dtype=np.int64)]
        width = max(path.shape[1], 2 if extend else 1)  # type: ignore[union-attr]
        pad = lambda a: np.concatenate([a, np.repeat(a[:, :1], width - a.shape[1], axis=1)], axis=1)  # noqa: E731
        anc = [pad(path)]
        for owner, toks in firsts:
            ids.append(toks)
            cand.append(np.full(toks.size, owner, dtype=np.int64))
            depths.append(np.ones(toks.size, dtype=np.int64))
            anc.append(pad(np.full((toks.size, 1), self.cand_key[owner], dtype=np.int64)))  # type: ignore[index]
        for run, go, toks in extend:
            parent_keys = np.repeat(run.keys[go], toks.shape[1])
            ids.append(toks.reshape(-1))
            cand.append(np.full(parent_keys.size, run.candidate, dtype=np.int64))
            depths.append(np.full(parent_keys.size, 2, dtype=np.int64))
            own = np.full(parent_keys.size, self.cand_key[run.candidate], dtype=np.int64)  # type: ignore[index]
            anc.append(pad(np.stack([own, parent_keys], axis=1)))
        cand_all = np.concatenate(cand)
        logits, keys = self._run(np.concatenate(ids), cand_all, np.concatenate(depths), np.concatenate(anc))
        self.row_path = np.concatenate([path, keys[:n, None]], axis=1)  # type: ignore[list-item]
        columns = [as_numpy(v)[self.cand_unit[cand_all[n:]], :, keys[n:]] for v in self.cache.values]
        ran, at = [], n
        for owner, toks in firsts:
            part = slice(at - n, at - n + toks.size)
            ran.append(Continuation(owner, toks, logits[at:at + toks.size], [c[part] for c in columns],
                                    keys[at:at + toks.size]))
            at += toks.size
        for run, go, toks in extend:
            part = slice(at - n, at - n + toks.size)
            run.went_on, run.rollout_tokens = go, toks
            run.rollout_logits, run.rollout_columns = logits[at:at + toks.size], [c[part] for c in columns]
            at += toks.size
        return logits[:n], ran

    def keep(self, mask: np.ndarray) -> None:
        self.row_cand, self.row_path = self.row_cand[mask], self.row_path[mask]  # type: ignore[index]


def packing_budget(model: CausalLM, parents: np.ndarray | Sequence[int]) -> int:
    """The most prefix positions a packed layout may copy on graphs that write in place: what
    COPY_BUDGET_BYTES holds (all layers' keys and values per position), or more when the layout
    that copies nothing would run even more padding positions (many rows, one wide tree: its
    activations would cost more memory than the copy)."""
    spec = model.spec
    slot_bytes = len(spec.past_names) * spec.num_kv_heads * spec.head_dim * np.dtype(spec.kv_dtype).itemsize
    p = np.asarray(parents, dtype=np.int64)
    counts = np.bincount(p - p.min())
    padding = counts.size * int(counts.max()) - p.size
    return max(COPY_BUDGET_BYTES // slot_bytes, padding)


def _pack_units(parents: np.ndarray, prefix_len: int, cap: int, tree_keys: Callable[[int], float],
                cache_rows: int = 0, copy_slots: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the candidates into units. Each batch row's candidates form items of at most `cap`;
    for m = 1, 2, 4, ... prefixes per unit, items go largest first to the least loaded unit with
    room, and the m with the least estimated work wins: every unit runs as wide as the widest, and
    each token attends to m prefixes plus its tree. Returns each candidate's unit and prefix block,
    and the batch row of each unit's blocks ([units, m], -1 where a block is empty).

    With `cache_rows` (graphs that write in place) the layout that copies nothing competes too:
    the cache's own rows, first to last row with candidates, each its own unit, the trees in the
    room after the prefix. Packed layouts copy their prefixes into new units; they are then only
    considered while that copy holds at most `copy_slots` key positions (it costs memory)."""
    items = []
    for b in np.unique(parents).tolist():
        members = np.flatnonzero(parents == b)
        items += [(b, chunk) for chunk in np.array_split(members, -(-members.size // cap))]
    items.sort(key=lambda it: -it[1].size)
    best = None
    counts = np.bincount(parents)
    if cache_rows and counts.max() <= cap:
        lo, hi = int(parents.min()), int(parents.max()) + 1
        width = int(counts.max())
        cost = (hi - lo) * width * (1 + (prefix_len + tree_keys(width)) / KEYS_PER_TOKEN)
        best = (cost, None, 1)
    m = 1
    while True:
        fill: list[list[int]] = []
        loads: list[int] = []
        for i, (_, chunk) in enumerate(items):
            room = [u for u in range(len(fill)) if len(fill[u]) < m and loads[u] + chunk.size <= cap]
            if room:
                u = min(room, key=lambda u: loads[u])
            else:
                u = len(fill)
                fill.append([])
                loads.append(0)
            fill[u].append(i)
            loads[u] += chunk.size
        width = max(loads)
        blocks = max(len(f) for f in fill)
        cost = len(fill) * width * (1 + (blocks * prefix_len + tree_keys(width)) / KEYS_PER_TOKEN)
        fits = best is None or copy_slots is None or len(fill) * blocks * prefix_len <= copy_slots
        if fits and (best is None or cost < best[0]):
            best = (cost, fill, blocks)
        if m >= len(items):
            break
        m *= 2
    _, fill, blocks = best
    if fill is None:  # the cache's own rows lo..hi-1
        return parents - lo, np.zeros(parents.size, dtype=np.int64), np.arange(lo, hi)[:, None]
    cand_unit = np.empty(parents.size, dtype=np.int64)
    cand_block = np.empty(parents.size, dtype=np.int64)
    unit_parents = np.full((len(fill), blocks), -1, dtype=np.int64)
    for u, members in enumerate(fill):
        for slot, i in enumerate(members):
            b, chunk = items[i]
            cand_unit[chunk], cand_block[chunk], unit_parents[u, slot] = u, slot, b
    return cand_unit, cand_block, unit_parents


def _unit_cache(cache: KVCache, unit_parents: np.ndarray, room: int) -> tuple[KVCache, bool]:
    """The units' prefix cache, with room for `room` tree tokens (graphs that write in place):
    each unit's blocks are its batch rows' caches side by side (empty blocks masked). When each
    unit is one batch row in order, the cache's own rows, uncopied; on graphs that write in
    place the tree then runs in the room after them (the bool says so)."""
    units, blocks = unit_parents.shape
    lo = int(unit_parents[0, 0])
    in_order = blocks == 1 and np.array_equal(unit_parents[:, 0], np.arange(lo, lo + units))
    if in_order and room and cache.room_is_free:
        cache.reserve(room, headroom=growth_headroom(cache.length, room))
        return _rows(cache, lo, units, cache.attention_mask[lo:lo + units], cache.next_position[lo:lo + units]), True
    if in_order and units == cache.rows:
        return cache, False
    src = np.maximum(unit_parents, 0)
    length = cache.length
    tensors = cache.tensors()  # [rows, heads, length, head_dim] each
    shape = (units, tensors[0].shape[1], blocks * length + room, tensors[0].shape[3])
    values = cache_buffers(len(tensors), shape, tensors[0].dtype)
    for a, out in zip(tensors, values):
        for b in range(blocks):
            out[:, :, b * length:(b + 1) * length] = a[src[:, b]]
    mask = np.where(unit_parents[..., None] < 0, 0, cache.attention_mask[src]).reshape(units, -1)
    return KVCache(values=values, attention_mask=mask, next_position=np.zeros(units, dtype=np.int64),
                   writes=BufferWrites(blocks * length) if room else None), False


def _rows(buffers: KVCache, lo: int, n: int, mask: np.ndarray, next_position: np.ndarray) -> KVCache:
    """Rows lo..lo+n-1 of `buffers`' tensors (views, so appending writes into `buffers`), as a
    cache with the given mask and positions."""
    values = buffers.values if lo == 0 and n == buffers.rows else [v[lo:lo + n] for v in buffers.values]
    return KVCache(values=values, attention_mask=mask, next_position=next_position, writes=buffers.writes)


def _slot_in_unit(unit: np.ndarray, units: int) -> np.ndarray:
    """Each token's slot within its unit: 0, 1, ... in order of appearance."""
    order = np.argsort(unit, kind="stable")
    starts = np.searchsorted(unit[order], np.arange(units))
    slot = np.empty(unit.size, dtype=np.int64)
    slot[order] = np.arange(unit.size) - starts[unit[order]]
    return slot


class TreeBranches:
    """The depth-0 state of each candidate of a token tree, as the cache a decoding step continues
    from: its batch row's prefix cache plus its own key/value column. Only the candidates' columns
    are kept from the tree (the tree's cache is freed after the next depth); the prefix is the
    decoding cache, which lives on anyway."""

    def __init__(self, prefix: KVCache, parents: np.ndarray, tree: KVCache, cand_unit: np.ndarray,
                 cand_key: np.ndarray):
        self.prefix, self.parents = prefix, parents
        self.columns = []  # per cache tensor: [candidates, heads, 1, head_dim]
        for v in tree.values:
            self.columns.append(as_numpy(v)[cand_unit, :, cand_key][:, :, None, :])

    def select(self, candidates: Sequence[int] | np.ndarray) -> KVCache:
        idx = np.asarray(candidates, dtype=np.int64)
        rows = self.prefix.select(self.parents[idx], room=None if self.prefix.capacity > self.prefix.length else 1)
        return _append_columns(rows, [col[idx] for col in self.columns])


Branch = tuple[KVCache | TreeBranches, int]


def branch(first_cache: KVCache | TreeBranches, k: int) -> Branch:
    """Candidate k's depth-0 state, kept across lookahead rounds: a forked row is cut out right
    away (so the round's forked caches can be freed); a tree branch is only a reference (the
    tree keeps just its candidates' columns)."""
    if isinstance(first_cache, TreeBranches):
        return first_cache, k
    return first_cache.select([k]), 0


def merge_branches(branches: Sequence[Branch]) -> KVCache:
    """The decoding cache that continues from the chosen candidates, one row each, in order.
    Tree branches are written into the room after their prefix: in place when every prefix row
    goes on in order (the usual EPIC step; the tree there was scratch), else into one new cache,
    never through per-row copies and a concatenation that would hold the cache several times."""
    prefix = getattr(branches[0][0], "prefix", None)
    if any(not isinstance(b, TreeBranches) or b.prefix is not prefix for b, _ in branches):
        return KVCache.concat([b.select([k]) for b, k in branches])
    rows = np.array([b.parents[k] for b, k in branches], dtype=np.int64)  # type: ignore[union-attr]
    has_room = prefix.capacity > prefix.length and prefix.writes is not None and prefix.room_is_free
    if not (has_room and np.array_equal(rows, np.arange(prefix.rows))):
        prefix = prefix.select(rows, room=None if prefix.capacity > prefix.length else 1)
    columns = [np.stack([b.columns[t][k] for b, k in branches]) for t in range(len(prefix.values))]  # type: ignore[union-attr]
    return _append_columns(prefix, columns)


def _append_columns(cache: KVCache, columns: Sequence[np.ndarray]) -> KVCache:
    """`cache` plus one token per row whose keys/values are `columns` ([rows, heads, 1, head_dim]
    per cache tensor), written into the cache's room (it must have some)."""
    n = cache.length
    for v, col in zip(cache.values, columns):
        v[:, :, n] = col[:, :, 0]
    if cache.writes is not None:
        cache.writes.end, cache.writes.scratch = n + 1, False
    mask = np.concatenate([cache.attention_mask, np.ones((cache.rows, 1), dtype=np.int64)], axis=1)
    return KVCache(values=cache.values, attention_mask=mask, next_position=cache.next_position + 1,
                   writes=cache.writes)
