"""Splitting a round's lookahead into memory-bounded calls (graphs without token trees) changes
cost, never the tokens; nor does running the lookahead as token trees instead of forked rows."""

from __future__ import annotations

import numpy as np

import epic_ort
from epic_ort.decoding import generate
from epic_ort.epic.sampler import EpicChooser


def _run(model, budget, scratch=None):
    chooser = EpicChooser(alpha=0.7, horizon=3, rollouts=2, kv_budget_bytes=budget)
    if scratch is not None:
        chooser.cache_scratch = scratch
    chooser.step_log = []
    cfg = epic_ort.GenerationConfig(max_new_tokens=10, alpha=0.7, horizon=3, rollouts=2, seed=4)
    samples = sorted(generate(model, ["the cat", "a dog ran"], cfg, num_samples=2, batch_size=4, chooser=chooser),
                     key=lambda s: (s.prompt_index, s.sample_index))
    return [s.token_ids for s in samples], chooser.step_log


def test_tiny_kv_budget_gives_same_tokens_with_more_calls(tiny_exports):
    model = epic_ort.load(tiny_exports["llama-optimum"]["onnx"], provider="cpu")  # forks the prefix per row
    assert not model.supports_trees
    big_tokens, big_log = _run(model, 1 << 30)
    small_tokens, small_log = _run(model, 1)  # one candidate per call
    assert big_tokens == small_tokens
    calls_big = sum(c for _, c, _ in big_log)
    calls_small = sum(c for _, c, _ in small_log)
    evals = sum(e for e, _, _ in small_log)
    assert calls_small > calls_big
    assert calls_small >= 3 * evals // 2  # every candidate ran its own k calls (minus EOS-shortened ones)


def test_epic_step_api_matches_generate(tiny_llama):
    """The one-step API picks the token generate() picks with the same random stream."""
    import numpy as np

    from epic_ort.epic import epic_step
    from epic_ort.sampling.sample import sample_rng

    prompt = "the cat"
    cfg = epic_ort.GenerationConfig(max_new_tokens=1, alpha=0.7, horizon=3, rollouts=2, seed=9)
    (s,) = list(generate(tiny_llama, [prompt], cfg))
    logits, cache = tiny_llama.prefill([tiny_llama.encode(prompt)])
    res = epic_step(tiny_llama, logits, cache, [sample_rng(9, 0, 0)], alpha=0.7, horizon=3, rollouts=2,
                    histories=[tiny_llama.encode(prompt)])
    assert int(res.tokens[0]) == s.token_ids[0]
    assert res.row_stats[0]["entropy_evals"] == s.stats["entropy_evals"]
    ref, _ = tiny_llama.step(res.tokens, cache)
    np.testing.assert_allclose(res.next_logits, ref, atol=1e-5)


def test_token_trees_give_the_tokens_of_forked_rows(tiny_llama, monkeypatch):
    """Whole EPIC generations (batch of 4, two prompts, rounds, early stopping) on the lean graph:
    token trees and forked rows choose the same tokens and count the same work."""
    tree_tokens, tree_log = _run(tiny_llama, 1 << 30)
    monkeypatch.setattr(type(tiny_llama), "supports_trees", property(lambda self: False))
    fork_tokens, fork_log = _run(tiny_llama, 1 << 30)
    assert tree_tokens == fork_tokens
    assert [e for e, _, _ in tree_log] == [e for e, _, _ in fork_log]


def test_trees_in_the_cache_room_spread_wide_rows_over_calls(tiny_llama, monkeypatch):
    """On a graph that writes in place, with a cache too long to copy, a row whose tree could
    outgrow the room kept after its cache spreads its candidates over calls: same tokens, more
    calls, and no row ever gets more candidates in one call than the room holds."""
    from epic_ort.epic import lookahead as la
    from epic_ort.epic import sampler as sp

    assert tiny_llama.kv_in_place
    wide_tokens, wide_log = _run(tiny_llama, 1 << 30)
    monkeypatch.setattr(la, "packing_budget", lambda model, parents: 0)  # as if the prefixes were long
    monkeypatch.setattr(sp, "packing_budget", lambda model, parents: 0)
    chunks = []
    real = sp.EpicChooser._chunks

    def spy(self, model, cache, parents):
        calls = real(self, model, cache, parents)
        fits = (cache.capacity - cache.length) // (1 + self.rollouts * (self.horizon - 1))
        assert sorted(np.concatenate(calls).tolist()) == list(range(len(parents)))  # each candidate once
        most = np.bincount(parents).max()
        assert len(calls) == -(-most // fits)  # as few calls as the widest row needs
        for idx in calls:
            assert np.bincount(np.asarray(parents)[idx]).max() <= fits
            chunks.append(idx.size)
        return calls

    monkeypatch.setattr(sp.EpicChooser, "_chunks", spy)
    monkeypatch.setattr(sp, "MIN_TREE_CANDIDATES", 2)  # so that a few candidates per row already split
    narrow_tokens, narrow_log = _run(tiny_llama, 1 << 30, scratch=2 * 5)  # room for 2 candidates' trees
    assert narrow_tokens == wide_tokens
    assert len(chunks) > len(narrow_log)  # some rounds were split
    assert sum(c for _, c, _ in narrow_log) > sum(c for _, c, _ in wide_log)
