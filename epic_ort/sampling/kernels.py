"""Row-wise kernels over a vocabulary: log-softmax, softmax, entropy, and inverse-CDF draws.

Computed in float64 where a long vocabulary would otherwise lose low-probability mass, except the fused
entropy/draw pass that EPIC's lookahead runs on every rollout row at every depth, which stays in
float32 with pairwise sums (see `entropy_and_draws`). Plain sampling draws with the same pass, so
both samplers' draws agree.
"""

from __future__ import annotations

import numpy as np



def _float_dtype(scores: np.ndarray) -> np.dtype:
    """float32 for float16/float32/integer input, float64 for float64: the helpers' output type."""
    return np.result_type(scores.dtype, np.float32)


def log_softmax64(scores: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float64.

    The row max is subtracted first so that huge logits (1e30) do not overflow. A row with no finite
    entry would give `-inf - -inf = NaN`, so its max is replaced by 0 and its log-normaliser by 0,
    which leaves every entry at `-inf`.
    """
    x = np.asarray(scores, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = x - m
    total = np.sum(np.exp(shifted), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, np.log(np.where(total > 0, total, 1.0)), 0.0)
    return shifted - lse


def softmax64(scores: np.ndarray) -> np.ndarray:
    """softmax over the last axis in float64; rows with no finite entry give all zeros."""
    x = np.asarray(scores, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the last axis.

    Computed in float64 with max-subtraction (stable for logits like 1e30) and returned as float32
    (float64 for float64 input). `-inf` stays `-inf`; a row that is entirely `-inf` stays entirely
    `-inf` instead of turning into NaN.
    """
    scores = np.asarray(scores)
    return log_softmax64(scores).astype(_float_dtype(scores), copy=False)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis.

    Computed in float64 (stable for huge logits) and returned as float32 (float64 for float64
    input). `-inf` entries get probability exactly 0; a row that is entirely `-inf` has no
    distribution and comes back as all zeros rather than NaN.
    """
    scores = np.asarray(scores)
    return softmax64(scores).astype(_float_dtype(scores), copy=False)


def entropy(scores: np.ndarray) -> np.ndarray:
    """Shannon entropy, in nats, of the softmax of each row of logits: shape `scores.shape[:-1]`.

    Terms with probability 0 contribute 0 (the limit of p·log p), so banned (`-inf`) tokens do not
    produce NaN; a row with a single finite entry has entropy exactly 0.0, and so, by the same
    convention, does a row that is entirely `-inf`. Returned as float64.
    """
    logp = log_softmax64(np.asarray(scores))
    p = np.exp(logp)
    terms = np.where(p > 0, logp, 0.0) * p
    return -np.sum(terms, axis=-1)


def entropy_and_draws(scores: np.ndarray, uniforms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`entropy(scores)` per row and, for each row's uniforms [rows, m], m inverse-CDF draws from
    softmax(scores) (as `sample.inverse_cdf`: the first token whose cumulative mass exceeds u).

    EPIC's lookahead needs both for every rollout row at every depth, and its rollout uniforms are
    fixed in advance, so one float32 exp pass serves both and the softmax is never materialized:
    H = log Z − Σ e·s / Z with s = x − max, e = exp(s), Z = Σ e, and the draws search the float64
    running sum of e for u·Z. A candidate's R rollouts share one running sum. Float32 with pairwise
    sums keeps H within ~1e-6 nats of the float64 value. Banned (`-inf`) entries get e = 0: they
    contribute 0 and are never drawn.
    """
    return _exp_pass(scores, uniforms, want_entropy=True)  # type: ignore[return-value]


def draws_from_scores(scores: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The draws of `entropy_and_draws` alone ([rows, m]), for plain sampling: no entropy pass."""
    return _exp_pass(scores, uniforms, want_entropy=False)[1]  # type: ignore[return-value]


def _exp_pass(scores: np.ndarray, uniforms: np.ndarray | None, want_entropy: bool
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
    x = np.asarray(scores)
    if len(x) > _ROWS_PER_PASS:  # bound the float32 temporaries (a wide token tree has ~1,000 rows)
        cut = range(0, len(x), _ROWS_PER_PASS)
        parts = [_exp_pass(x[i : i + _ROWS_PER_PASS], None if uniforms is None else uniforms[i : i + _ROWS_PER_PASS],
                           want_entropy) for i in cut]
        h = np.concatenate([p[0] for p in parts]) if want_entropy else None  # type: ignore[misc]
        return h, None if uniforms is None else np.concatenate([p[1] for p in parts])  # type: ignore[misc]
    x = np.asarray(x, dtype=np.float32)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, np.float32(0.0))
    s = np.subtract(x, m)
    h = None
    if not want_entropy:  # the draws need e alone: exponentiate in place
        e = np.exp(s, out=s)
    else:
        np.maximum(s, np.float32(-200.0), out=s)  # exp(-200) is 0 in float32, and 0 * -200 is 0, not NaN
        e = np.exp(s)
        # float32 pairwise sums (numpy's reduction along a contiguous axis): ~1e-7 relative, half the
        # time of float64 accumulation
        z = np.add.reduce(e, axis=-1).astype(np.float64)
        z = np.where(z > 0, z, 1.0)
        es = np.multiply(e, s, out=s)  # s is not needed after this
        h = np.maximum(np.log(z) - np.add.reduce(es, axis=-1).astype(np.float64) / z, 0.0)
    if uniforms is None:
        return h, None
    u = np.asarray(uniforms, dtype=np.float64).reshape(len(x), -1)
    draws = _search_mass(e, u)
    rows = np.repeat(np.arange(len(x)), u.shape[1]).reshape(u.shape)
    bad = e[rows, draws] == 0  # rounding at the top end: never a zero-probability token
    if bad.any():
        draws[bad] = np.argmax(e, axis=-1)[rows[bad]]
    return h, draws


_BLOCK = 1024
_ROWS_PER_PASS = 4  # rows per exp pass: their float32 temporaries stay in the L2 cache (bench/README)


def _search_mass(e: np.ndarray, u: np.ndarray) -> np.ndarray:
    """For each row of weights e [rows, V] and each u in u[row]: the first index whose float64
    running sum exceeds u · (total), i.e. searchsorted(cumsum(e), u·total, side="right").

    The running sum is taken over blocks of _BLOCK first, then within the one block each draw lands
    in, so the full [rows, V] float64 cumsum (the largest pass of the lookahead) is never built."""
    rows, vocab = e.shape
    nblocks = -(-vocab // _BLOCK)
    if nblocks * _BLOCK != vocab:
        e = np.concatenate([e, np.zeros((rows, nblocks * _BLOCK - vocab), dtype=e.dtype)], axis=1)
    blocked = e.reshape(rows, nblocks, _BLOCK)
    block_sums = blocked.sum(axis=-1)  # float32 pairwise: ~1e-7 relative
    block_cdf = np.cumsum(block_sums, axis=-1, dtype=np.float64)
    # all draws of all rows at once: the block of each target, then the running sum within it
    targets = u * block_cdf[:, -1:]  # [rows, m]
    blocks = np.minimum((block_cdf[:, None, :] <= targets[:, :, None]).sum(axis=-1), nblocks - 1).ravel()
    owner = np.repeat(np.arange(rows), u.shape[1])
    start = np.where(blocks > 0, block_cdf[owner, np.maximum(blocks - 1, 0)], 0.0)
    inner = start[:, None] + np.cumsum(blocked[owner, blocks], axis=1, dtype=np.float64)
    # min: a target past the block's float64 running sum (within rounding of its float32 block
    # sum) stays in the block it was assigned to
    within = np.minimum((inner <= targets.ravel()[:, None]).sum(axis=1), _BLOCK - 1)
    draws = (blocks * _BLOCK + within).reshape(u.shape)
    return np.minimum(draws, vocab - 1)
