"""The row-wise kernels (epic_ort.sampling.kernels): softmax, entropy and the fused entropy/draw pass
against float64 references and torch; plain sampling's draws against the float64 inverse CDF."""

from __future__ import annotations

import math

import numpy as np
import pytest

from epic_ort.sampling.kernels import entropy, entropy_and_draws, log_softmax, softmax, softmax64


def make_logits(seed: int, vocab: int) -> np.ndarray:
    """[4, vocab] float32 logits: plain, a quarter banned, heavy ties, ties and banned tokens."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, vocab)) * rng.uniform(1.0, 4.0)
    x[1, rng.choice(vocab, vocab // 4, replace=False)] = -np.inf
    x[2] = rng.choice(rng.standard_normal(6) * 3, size=vocab)
    x[3, rng.choice(vocab, vocab // 5, replace=False)] = x[3].max()
    x[3, rng.choice(vocab, vocab // 5, replace=False)] = -np.inf
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# log_softmax / softmax / entropy
# ---------------------------------------------------------------------------------------------


def test_entropy_hand_computed():
    x = np.log(np.array([[0.5, 0.25, 0.25]], dtype=np.float64)).astype(np.float32)
    np.testing.assert_allclose(entropy(x), [1.5 * math.log(2)], rtol=1e-6)
    # entropy is a function of the distribution: shifting every logit changes nothing
    np.testing.assert_allclose(entropy(x + 1000.0), [1.5 * math.log(2)], rtol=1e-5)
    # -inf entries contribute nothing
    y = np.array([[math.log(0.5), -np.inf, math.log(0.25), math.log(0.25), -np.inf]], dtype=np.float32)
    np.testing.assert_allclose(entropy(y), [1.5 * math.log(2)], rtol=1e-6)


def test_entropy_degenerate_and_uniform():
    one_hot = np.array([[-np.inf, 3.0, -np.inf, -np.inf], [7.0, -1e30, -1e30, -1e30]], dtype=np.float32)
    h = entropy(one_hot)
    assert h.shape == (2,)
    assert h[0] == 0.0
    assert 0.0 <= h[1] < 1e-12
    all_banned = np.full((1, 5), -np.inf, dtype=np.float32)
    assert entropy(all_banned)[0] == 0.0
    for vocab in (1, 7, 49152):
        np.testing.assert_allclose(entropy(np.full((2, vocab), -3.5, np.float32)), math.log(vocab), rtol=1e-9, atol=1e-12)


def test_log_softmax_and_softmax_match_torch():
    torch = pytest.importorskip("torch")
    scores = make_logits(3, 1000)
    ls = log_softmax(scores)
    assert ls.dtype == np.float32 and ls.shape == scores.shape
    ref = torch.log_softmax(torch.from_numpy(scores).double(), dim=-1).numpy()
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(ls), finite)
    np.testing.assert_allclose(ls[finite], ref[finite], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(softmax(scores), np.exp(ref), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(entropy(scores), -(np.exp(ref) * np.where(finite, ref, 0)).sum(-1), rtol=1e-9)


def test_softmax_helpers_are_stable():
    x = np.array([[1e30, -1e30, -np.inf, 1e30], [-np.inf] * 4], dtype=np.float32)
    ls, p = log_softmax(x), softmax(x)
    assert not np.isnan(ls).any() and not np.isnan(p).any()
    np.testing.assert_allclose(p[0], [0.5, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(ls[0, [0, 3]], math.log(0.5), rtol=1e-6)
    assert np.isneginf(ls[0, 2]) and np.isneginf(ls[1]).all()
    assert (p[1] == 0).all()


def test_entropy_and_draws_match_the_float64_helpers():
    """The lookahead's fused float32 pass: entropies agree with entropy() in float64, and its draws
    with inverse_cdf(softmax()) for the same uniforms (up to the rare u on a rounding boundary)."""
    from epic_ort.sampling.sample import inverse_cdf

    rng = np.random.default_rng(3)
    x = rng.normal(0, 4, (6, 5000)).astype(np.float32)
    x[1, :4000] = -np.inf  # banned tokens
    x[2, :] = -np.inf
    x[2, 7] = 1.0  # one finite entry: entropy exactly 0
    x[3] *= 1e4  # nearly one-hot, huge logits
    x[4] = 0.0  # uniform: log(5000)
    u = rng.random((6, 400))
    u[:, 0] = 0.0
    u[:, 1] = np.nextafter(1.0, 0.0)  # the top end
    h, draws = entropy_and_draws(x, u)
    np.testing.assert_allclose(h, entropy(x.astype(np.float64)), atol=1e-5)
    assert h[2] == 0.0 and abs(h[4] - np.log(5000)) < 1e-5 and np.isfinite(h).all()
    p = softmax(x.astype(np.float64))
    ref = np.stack([inverse_cdf(np.repeat(p[i : i + 1], 400, axis=0), u[i]) for i in range(6)])
    assert (draws == ref).mean() > 0.995
    assert (p[np.arange(6)[:, None], draws] > 0).all()  # banned tokens never drawn
    assert (draws[1] >= 4000).all() and (draws[2] == 7).all()
    # the draws follow the distribution: chi-square over the uniform row's 10 deciles of tokens
    big = entropy_and_draws(x[4:5], rng.random((1, 20000)))[1][0]
    counts = np.bincount(big // 500, minlength=10)
    assert ((counts - 2000) ** 2 / 2000).sum() < 27.9  # chi2(9) 0.999 quantile
    assert entropy_and_draws(x)[1] is None


def test_entropy_and_draws_in_row_chunks_is_the_same(monkeypatch):
    from epic_ort.sampling import kernels as processors

    rng = np.random.default_rng(4)
    x = rng.normal(0, 3, (7, 3000)).astype(np.float32)
    u = rng.random((7, 3))
    whole = processors.entropy_and_draws(x, u)
    monkeypatch.setattr(processors, "_ROWS_PER_PASS", 2)
    parts = processors.entropy_and_draws(x, u)
    np.testing.assert_array_equal(whole[0], parts[0])
    np.testing.assert_array_equal(whole[1], parts[1])
    np.testing.assert_array_equal(whole[0], processors.entropy_and_draws(x)[0])


def test_sample_categorical_draws_the_float64_inverse_cdf_token():
    """Plain sampling's fast draws land where the float64 inverse CDF does for the same uniform
    (up to a u on a rounding boundary) and never on a banned token."""
    import copy

    from epic_ort.sampling.sample import inverse_cdf, sample_categorical, sample_rng

    rng = np.random.default_rng(8)
    scores = (rng.standard_normal((400, 3000)) * 4).astype(np.float32)
    scores[:, rng.choice(3000, 500, replace=False)] = -np.inf
    rngs = [sample_rng(3, i, 0) for i in range(400)]
    twins = [copy.deepcopy(r) for r in rngs]
    got = sample_categorical(scores, rngs)
    ref = inverse_cdf(softmax64(scores), np.array([r.random() for r in twins]))
    assert np.mean(got == ref) >= 0.995
    assert np.isfinite(scores[np.arange(400), got]).all()
