"""Splitting a round's lookahead into memory-bounded calls changes cost, never the tokens."""

from __future__ import annotations

import epic_ort
from epic_ort.decoding import generate
from epic_ort.epic.sampler import EpicChooser


def _run(model, budget):
    chooser = EpicChooser(alpha=0.7, horizon=3, rollouts=2, kv_budget_bytes=budget)
    chooser.step_log = []
    cfg = epic_ort.GenerationConfig(max_new_tokens=10, alpha=0.7, horizon=3, rollouts=2, seed=4)
    samples = sorted(generate(model, ["the cat", "a dog ran"], cfg, num_samples=2, batch_size=4, chooser=chooser),
                     key=lambda s: (s.prompt_index, s.sample_index))
    return [s.token_ids for s in samples], chooser.step_log


def test_tiny_kv_budget_gives_same_tokens_with_more_calls(tiny_llama):
    big_tokens, big_log = _run(tiny_llama, 1 << 30)
    small_tokens, small_log = _run(tiny_llama, 1)  # one candidate per call
    assert big_tokens == small_tokens
    calls_big = sum(c for _, c, _ in big_log)
    calls_small = sum(c for _, c, _ in small_log)
    evals = sum(e for e, _, _ in small_log)
    assert calls_small > calls_big
    assert calls_small >= 3 * evals // 2  # every candidate ran its own k calls (minus EOS-shortened ones)
