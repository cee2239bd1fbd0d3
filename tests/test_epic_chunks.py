"""How EPIC's lookahead is cut into calls and laid out (memory-bounded forked calls, token trees vs
forked rows, trees spread over calls when the cache's room is short) changes cost, not choices."""

from __future__ import annotations

import numpy as np

import epic_ort
from epic_ort.decoding import generate
from epic_ort.epic import calls as lookahead_calls
from epic_ort.epic.chooser import EpicChooser
from epic_helpers import step_agreement

CFG = epic_ort.GenerationConfig(max_new_tokens=12, alpha=0.7, horizon=3, rollouts=2, seed=4)
PROMPTS = ["the cat", "a dog ran"]


def _chooser(**kw):
    return EpicChooser(alpha=CFG.alpha, horizon=CFG.horizon, rollouts=CFG.rollouts, **kw)


def _forked_twin(model):
    """The same export loaded again, made to lay its lookahead out as forked rows."""
    twin = epic_ort.load(model.model_dir, provider="cpu")
    twin.__class__ = type("ForkedRowsModel", (type(model),), {"supports_trees": property(lambda self: False)})
    assert not twin.supports_trees and model.supports_trees
    return twin


def test_tiny_kv_budget_chooses_the_same_with_more_calls(tiny_exports):
    model = epic_ort.load(tiny_exports["llama-optimum"]["onnx"], provider="cpu")  # forks the prefix per row
    assert not model.supports_trees
    big, small = _chooser(kv_budget_bytes=1 << 30), _chooser(kv_budget_bytes=1)  # small: one candidate per call
    report = step_agreement(model, big, small, PROMPTS, CFG, num_samples=4)
    assert report.steps >= 20 and report.agreement >= 0.95, report
    assert report.calls_b > report.calls_a
    assert report.calls_b >= 3 * report.evals_b // 2  # every candidate ran its own k calls (minus EOS-shortened ones)


def test_epic_step_api_matches_generate(tiny_llama):
    """The one-step API picks the token generate() picks with the same random stream."""
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


def test_token_trees_choose_what_forked_rows_choose(tiny_llama):
    """Token trees and forked rows on the same lean graph: the same choices at nearly every step
    (see epic_helpers on rounding) and the same work counted."""
    report = step_agreement(tiny_llama, _chooser(run_ahead=False), _chooser(run_ahead=False), PROMPTS, CFG,
                            num_samples=4, model_b=_forked_twin(tiny_llama))
    assert report.steps >= 20 and report.agreement >= 0.95, report
    assert report.evals_a == report.evals_b or report.agreement < 1


def test_trees_in_the_cache_room_spread_wide_rows_over_calls(tiny_llama, monkeypatch):
    """On a graph that writes in place, with a cache too long to copy, a row whose tree could
    outgrow the room kept after its cache spreads its candidates over calls: the same choices, more
    calls, and no row ever gets more candidates in one call than the room holds."""
    assert tiny_llama.kv_in_place
    monkeypatch.setattr(lookahead_calls, "packing_budget", lambda model, parents: 0)  # as if the prefixes were long
    monkeypatch.setattr(lookahead_calls, "MIN_TREE_CANDIDATES", 2)  # so that a few candidates per row already split
    chunks = []
    real = lookahead_calls.tree_calls

    def spy(model, cache, parents, tree_tokens, rollouts=2):
        calls = real(model, cache, parents, tree_tokens, rollouts)
        fits = (cache.capacity - cache.length) // tree_tokens
        assert sorted(np.concatenate(calls).tolist()) == list(range(len(parents)))  # each candidate once
        assert len(calls) == 1 or len(calls) == -(-np.bincount(parents).max() // fits)  # as few as needed
        for idx in calls:
            assert len(calls) == 1 or np.bincount(np.asarray(parents)[idx]).max() <= fits
            chunks.append(len(calls))
        return calls

    monkeypatch.setattr("epic_ort.epic.chooser.tree_calls", spy)
    wide = _chooser(run_ahead=False)
    narrow = _chooser(run_ahead=False)
    narrow.scratch_positions = 2 * narrow.tree_tokens  # room for 2 candidates' trees
    report = step_agreement(tiny_llama, wide, narrow, PROMPTS, CFG, num_samples=4)
    assert report.agreement >= 0.95, report
    assert max(chunks) > 1  # some rounds were split
    assert report.calls_b > report.calls_a


def test_a_round_too_wide_for_the_logits_budget_is_cut_into_calls(tiny_llama, monkeypatch):
    """A round whose lookahead logits would pass the budget runs as several calls, each within it,
    every row's best candidates first: the same choices, more calls."""
    cap_rows = 6
    monkeypatch.setattr(lookahead_calls, "LOGITS_BUDGET_BYTES", cap_rows * 4 * tiny_llama.vocab_size * CFG.rollouts)
    assert lookahead_calls.logits_cap(tiny_llama, CFG.rollouts) == max(lookahead_calls.MIN_TREE_CANDIDATES, cap_rows)
    sizes = []
    real = lookahead_calls.tree_calls

    def spy(model, cache, parents, tree_tokens, rollouts=2):
        calls = real(model, cache, parents, tree_tokens, rollouts)
        assert sorted(np.concatenate(calls).tolist()) == list(range(len(parents)))
        sizes.extend(idx.size for idx in calls)
        assert len(calls) == -(-len(parents) // lookahead_calls.logits_cap(model, rollouts))  # as few as the budget allows
        return calls

    monkeypatch.setattr("epic_ort.epic.chooser.tree_calls", spy)
    unlimited = _chooser(run_ahead=False)
    unlimited._calls = lambda model, cache, parents: [np.arange(len(parents))]  # one call a round, however wide
    report = step_agreement(tiny_llama, unlimited, _chooser(run_ahead=False), PROMPTS, CFG, num_samples=2)
    assert report.agreement >= 0.95, report
    assert max(sizes) <= lookahead_calls.logits_cap(tiny_llama, CFG.rollouts) and len(sizes) > report.steps
    assert report.calls_b > report.calls_a
