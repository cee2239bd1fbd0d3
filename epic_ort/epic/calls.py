"""How a round's candidates are cut into lookahead calls: as few as the logits budget and the
cache's room for trees allow, every row's best candidates in the first call (so the pruner of a
later call knows a better best)."""

from __future__ import annotations

import numpy as np

from ..runtime.cache import KVCache
from ..runtime.model import CausalLM
from .tree import packing_budget

MIN_TREE_CANDIDATES = 8  # cache room below this many candidates' trees is not room kept for trees
LOGITS_BUDGET_BYTES = 256 << 20  # the float32 logits one lookahead call may produce (its rows x vocabulary)


def logits_cap(model: CausalLM, rollouts: int) -> int:
    """Most candidates one lookahead call takes: each depth after the first runs R rows a candidate,
    each row's logits are a vocabulary of float32, and a wide round (many rows, a large alpha, a
    262k vocabulary) must not hold gigabytes of them at once."""
    return max(MIN_TREE_CANDIDATES, LOGITS_BUDGET_BYTES // (4 * int(model.vocab_size) * max(int(rollouts), 1)))


def _ranks(parents: np.ndarray) -> np.ndarray:
    """Each candidate's place among its row's (candidates come in each row's order of preference)."""
    rank = np.empty(parents.size, dtype=np.int64)
    for row in np.unique(parents):
        members = np.flatnonzero(parents == row)
        rank[members] = np.arange(members.size)
    return rank


def spread_over_calls(parents: np.ndarray, per_row: int) -> list[np.ndarray]:
    """Candidates cut into calls holding at most `per_row` of any row: the first call takes every
    row's best, and so on."""
    call = _ranks(parents) // max(per_row, 1)
    return [np.flatnonzero(call == c) for c in range(int(call.max()) + 1)]


def cap_calls(parents: np.ndarray, calls: list[np.ndarray], cap: int) -> list[np.ndarray]:
    """Each call cut into as few pieces of at most `cap` candidates as it takes, the rows' candidates
    interleaved by preference so that each piece holds every row's next best ones."""
    out = []
    for idx in calls:
        if idx.size <= cap:
            out.append(idx)
            continue
        order = idx[np.lexsort((parents[idx], _ranks(parents[idx])))]
        out += [np.sort(order[i:i + cap]) for i in range(0, order.size, cap)]
    return out


def tree_calls(model: CausalLM, cache: KVCache, parents: np.ndarray, tree_tokens: int, rollouts: int = 2
               ) -> list[np.ndarray]:
    """Split a round's candidates (indices, ascending) into lookahead calls. Token trees do not copy
    the prefix per candidate: one call, unless its logits would pass LOGITS_BUDGET_BYTES
    (`logits_cap`). On graphs that write in place, when the rows' prefixes are too long to copy
    (see `packing_budget`), the trees run in the decoding cache's own room, and a row whose tree could
    outgrow it spreads its candidates over calls, the first so many of every row in the first call,
    and so on (growing the cache instead would hold two copies of it for a moment). `tree_tokens`: a
    candidate's tree size when no rollout stops."""
    n = parents.size
    cap = logits_cap(model, rollouts)
    fits = (cache.capacity - cache.length) // tree_tokens
    if not model.kv_in_place or fits < MIN_TREE_CANDIDATES or \
            np.unique(parents).size * cache.length <= packing_budget(model, parents):  # packing may copy them
        calls = [np.arange(n)]
    else:
        calls = spread_over_calls(parents, fits)
    return cap_calls(parents, calls, cap)
