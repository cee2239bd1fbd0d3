"""Token trees: EPIC's lookahead as positions of one model row per batch row (lean graphs).

The candidates, then their rollouts, are positions of one model row (a *unit*) over the prefix
cache of their batch row; a tree mask lets each token see its prefix, its own ancestors and itself.
The prefix is never copied per candidate. On graphs that write the cache in place the tree is
scratch in the room after the decoding cache itself (nothing copied) unless grouping short rows'
prefixes into shared units, which copies them, is both cheaper and within COPY_BUDGET_BYTES. Every
cache read and write goes through the cache protocol (runtime/cache.py).

The chosen candidate's depth-0 key/value column is all that is kept of a tree (`TreeBranches`):
appended to the decoding cache, it is the next step's cache, so that step costs no model call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from .run_ahead import Continuation, Extends, Firsts, Given
from .segments import can_split, forward_in_runs, split_units

MAX_UNIT_TOKENS = 256  # tree tokens of one unit in one call (rotary tables also cap it at max_positions)
KEYS_PER_TOKEN = 2000  # rough cost model: attending to this many keys costs about one token through the weights
COPY_BUDGET_BYTES = 64 << 20  # in-place graphs: most cache a packed layout may copy (else rows layout)


class TreeRows:
    """Candidates and rollouts as token trees over their prefixes. A unit is one model row: the
    prefixes of one or a few batch rows side by side (a few when their trees are small, so that
    units are about equally wide: narrower ones are padded) followed by their tree tokens. Each
    token sees its own prefix, its ancestors and itself; all else is masked out."""

    def __init__(self, model: CausalLM, cache: KVCache, parents: np.ndarray, rollouts: int, horizon: int):
        self.model, self.calls = model, 0
        cap = max(1, min(MAX_UNIT_TOKENS, model.max_positions) // max(rollouts, 1))
        tree_keys = lambda width: width * (1 + rollouts * (horizon - 1)) / 2  # noqa: E731 (mean tree size)
        copy_slots = packing_budget(model, parents) if model.kv_in_place else None
        self.cand_unit, self.cand_block, self.unit_parents = pack_units(
            parents, cache.length, cap, tree_keys, cache.rows if model.kv_in_place else 0, copy_slots)
        self.parents, self.prefix_len = parents, cache.length
        self.prefix_next = cache.next_position
        self.blocks = self.unit_parents.shape[1]
        self.prefix = cache
        widest = int(np.bincount(self.cand_unit).max())  # depth 0's width; later depths make room as they go
        room = widest if model.kv_in_place else 0
        self.cache, self.in_prefix = unit_cache(cache, self.unit_parents, room, room * (1 + rollouts * (horizon - 1)))
        self.cand_key: np.ndarray | None = None  # each candidate's key column in its unit (after depth 0)
        self.row_cand: np.ndarray | None = None  # rollout rows: their candidate, and the key columns
        self.row_path: np.ndarray | None = None  # of their tree ancestors

    def _run(self, tokens: np.ndarray, cand: np.ndarray, depth: int | np.ndarray, ancestors: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per entry of `cand` (the candidate each belongs to), at tree depth
        `depth` (one for all, or one per token); return their logits and key columns.
        `ancestors` [tokens, d]: tree key columns each token also sees, besides its prefix and itself."""
        units, unit = int(self.unit_parents.shape[0]), self.cand_unit[cand]
        col = slot_in_unit(unit, units)
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
        runs = self._runs(unit, col, width)
        if runs is None:
            logits, self.cache = self.model.forward(ids, self.cache, real, positions=positions, tree_mask=tree,
                                                    logits_at=(unit, col), scratch=True)
        else:
            logits, self.cache = forward_in_runs(self.model, self.cache, runs, ids, real, positions, tree, unit, col)
        self.calls += 1
        return logits, past + col

    def _runs(self, unit: np.ndarray, col: np.ndarray, width: int) -> list[tuple[int, int]] | None:
        """The runs of units to call one by one (segments.py), or None for one call of all units."""
        units = int(self.unit_parents.shape[0])
        if units == 1:
            return None
        if not self.in_prefix and self.cache.capacity < self.cache.length + width and self.cache.room_is_free:
            self.cache.grow_room(width)  # before the runs' views are taken: a run must not move the buffers
        if not can_split(self.model, self.cache) or self.cache.capacity < self.cache.length + width:
            return None
        widths = np.zeros(units, dtype=np.int64)
        np.maximum.at(widths, unit, col + 1)
        runs = split_units(widths, self.cache.length, KEYS_PER_TOKEN)
        return None if runs == [(0, units)] else runs

    def _make_room(self, width: int) -> None:
        """Room for `width` more tree tokens: a tree in the decoding cache's own room grows that
        cache itself, tree so far included, so later steps find the room."""
        past = self.cache.length
        if self.in_prefix and self.cache.capacity < past + width:
            self.prefix.grow_room(width, used=past)
            self.cache = self.prefix.row_span(int(self.unit_parents[0, 0]), int(self.unit_parents.shape[0]),
                                              self.cache.attention_mask, self.cache.next_position)

    def _place(self, cand: np.ndarray, columns: Sequence[np.ndarray]) -> np.ndarray | None:
        """Write candidates `cand`'s depth-0 key/value columns (run ahead by an earlier call) into
        the tree, after what it holds, as `_run` would have; their key columns, or None where the
        tree's cache is not ours to write (the caller then runs them)."""
        units, unit = int(self.unit_parents.shape[0]), self.cand_unit[cand]
        col = slot_in_unit(unit, units)
        width = int(col.max()) + 1
        self._make_room(width)
        past = self.cache.length
        placed = self.cache.write_scratch(unit, col, columns, width)
        if placed is None:
            return None
        self.cache = placed
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

    def step_ahead(self, tokens: np.ndarray, depth: int, firsts: Firsts,
                   extend: Extends) -> tuple[np.ndarray, list[Continuation]]:
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
        columns = self.cache.columns(self.cand_unit[cand_all[n:]], keys[n:])
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


def pack_units(parents: np.ndarray, prefix_len: int, cap: int, tree_keys: Callable[[int], float],
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


def slot_in_unit(unit: np.ndarray, units: int) -> np.ndarray:
    """Each token's slot within its unit: 0, 1, ... in order of appearance."""
    order = np.argsort(unit, kind="stable")
    starts = np.searchsorted(unit[order], np.arange(units))
    slot = np.empty(unit.size, dtype=np.int64)
    slot[order] = np.arange(unit.size) - starts[unit[order]]
    return slot


def unit_cache(cache: KVCache, unit_parents: np.ndarray, room: int, tree_room: int) -> tuple[KVCache, bool]:
    """The units' prefix cache, with room for `room` tree tokens (graphs that write in place):
    each unit's blocks are its batch rows' caches side by side (empty blocks masked). When each
    unit is one batch row in order, the cache's own rows, uncopied; on graphs that write in
    place the tree then runs in the room after them (the bool says so). A packed copy gets
    `tree_room` (the whole tree's most tokens) instead: room that a later depth lacked would
    copy the packed prefixes a second time."""
    units, blocks = unit_parents.shape
    lo = int(unit_parents[0, 0])
    in_order = blocks == 1 and np.array_equal(unit_parents[:, 0], np.arange(lo, lo + units))
    if in_order and room and cache.room_is_free:
        cache.grow_room(room)
        return cache.row_span(lo, units, cache.attention_mask[lo:lo + units], cache.next_position[lo:lo + units]), True
    if in_order and units == cache.rows:
        return cache, False
    return cache.gather_blocks(unit_parents, tree_room), False


class TreeBranches:
    """The depth-0 state of each candidate of a token tree, as the cache a decoding step continues
    from: its batch row's prefix cache plus its own key/value column. Only the candidates' columns
    are kept from the tree (the tree's cache is freed after the next depth); the prefix is the
    decoding cache, which lives on anyway."""

    def __init__(self, prefix: KVCache, parents: np.ndarray, tree: KVCache, cand_unit: np.ndarray,
                 cand_key: np.ndarray):
        self.prefix, self.parents = prefix, parents
        self.columns = [c[:, :, None, :] for c in tree.columns(cand_unit, cand_key)]  # [candidates, heads, 1, dim]

    def select(self, candidates: Sequence[int] | np.ndarray) -> KVCache:
        idx = np.asarray(candidates, dtype=np.int64)
        rows = self.prefix.select(self.parents[idx], room=None if self.prefix.capacity > self.prefix.length else 1)
        return rows.append_columns([col[idx] for col in self.columns])


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
    if not (prefix.appendable_in_place and np.array_equal(rows, np.arange(prefix.rows))):
        prefix = prefix.select(rows, room=None if prefix.capacity > prefix.length else 1)
    columns = [np.stack([b.columns[t][k] for b, k in branches]) for t in range(len(prefix.values))]  # type: ignore[union-attr]
    return prefix.append_columns(columns)
