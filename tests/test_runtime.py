"""Exported tiny models against PyTorch: logits at prefill and cached steps, padding, fork."""

from __future__ import annotations

import numpy as np
import pytest

import epic_ort
from epic_ort.runtime.model import left_pad


def _hf_logits(hf_dir, ids, mask):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        pos = torch.tensor(mask).long().cumsum(-1) - 1
        pos.masked_fill_(torch.tensor(mask) == 0, 1)
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos)
    return out.logits.numpy()


def test_prefill_and_cached_steps_match_pytorch(tiny):
    kind, hf_dir, onnx_dir = tiny
    model = epic_ort.load(onnx_dir, provider="cpu")
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, model.vocab_size, size=n)) for n in (7, 3, 5)]
    extra = rng.integers(3, model.vocab_size, size=(3, 4))
    ids, mask = left_pad(rows, pad_id=2)
    # reference: the whole sequence at once in PyTorch
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    ref = _hf_logits(hf_dir, full_ids, full_mask)

    logits, cache = model.forward(ids, model.empty_cache(3), mask, last_only=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref[:, : ids.shape[1]][real], atol=1e-4)
    for t in range(extra.shape[1]):
        logits, cache = model.step(extra[:, t], cache)
        np.testing.assert_allclose(logits, ref[:, ids.shape[1] + t], atol=1e-4)
    assert cache.length == full_ids.shape[1]
    np.testing.assert_array_equal(cache.next_position, [7 + 4, 3 + 4, 5 + 4])


def test_fork_equals_separate_runs(tiny_llama):
    model = tiny_llama
    a, b = model.encode("hello there"), model.encode("a cat")
    logits, cache = model.prefill([a, b])
    forked = cache.select([1, 1, 0, 1])
    tokens = np.array([5, 6, 7, 8])
    out, _ = model.step(tokens, forked)
    for i, (row, tok) in enumerate(zip([1, 1, 0, 1], tokens)):
        solo_logits, solo_cache = model.prefill([[a, b][row]])
        ref, _ = model.step(np.array([tok]), solo_cache)
        np.testing.assert_allclose(out[i], ref[0], atol=1e-4)


def test_manifest_records_graph_facts(tiny):
    kind, _, onnx_dir = tiny
    model = epic_ort.load(onnx_dir, provider="cpu")
    m = model.manifest
    assert m.num_layers == 2 and m.vocab_size == model.vocab_size == 35
    assert m.eos_token_ids == [2]
    assert m.model_type == kind.split("-")[0]
    # Llama gets the lean graph by default; Optimum only where asked or where lean does not apply
    assert m.graph == {"llama": "lean", "llama-optimum": "optimum", "gpt2": "optimum"}[kind]
    from epic_ort.fileio import sha256_file

    assert m.model_sha256 == sha256_file(onnx_dir / "model.onnx")


def test_present_buffers_hold_the_new_cache(tiny, monkeypatch):
    """A step written into preallocated buffers gives the cache ORT would have allocated, as views
    of those buffers, alternating between the two sets; a buffer too small is not used."""
    _, _, onnx_dir = tiny
    model = epic_ort.load(onnx_dir, provider="cpu")
    if model.kv_in_place:  # the lean graph without in-place writes (how it runs on a GPU)
        monkeypatch.setattr(type(model), "kv_in_place", property(lambda self: False))
    logits, cache = model.prefill([[1, 5, 6, 7], [1, 8]])
    buffers = model.step_buffers(rows=2, max_length=8)
    tokens = np.array([9, 10])
    ref_logits, ref = model.step(tokens, cache)
    first = buffers.next()
    got_logits, got = model.step(tokens, cache, present_buffers=first)
    np.testing.assert_array_equal(got_logits, ref_logits)
    for v, r, buf in zip(got.values, ref.values, first):
        assert np.shares_memory(v, buf)
        np.testing.assert_array_equal(v, r.numpy())
    second = buffers.next()
    assert not any(np.shares_memory(a, b) for a, b in zip(first, second))
    l2, c2 = model.step(tokens, got, present_buffers=second)
    r2, _ = model.step(tokens, ref)
    np.testing.assert_allclose(l2, r2, atol=1e-6)
    assert all(np.shares_memory(v, buf) for v, buf in zip(c2.values, second))
    small = model.step_buffers(rows=2, max_length=3).next()  # the new cache needs 5 positions
    _, c3 = model.step(tokens, cache, present_buffers=small)
    assert not any(isinstance(v, np.ndarray) and np.shares_memory(v, b) for v, b in zip(c3.values, small))


def _no_in_place(monkeypatch, model):
    monkeypatch.setattr(type(model), "kv_in_place", property(lambda self: False))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_generation_is_the_same_however_the_cache_is_kept(tiny_llama, monkeypatch, alpha):
    """Writing the cache in place, into ORT-allocated tensors, or into the decode loop's
    alternating buffers changes where the cache lives, never the tokens (plain sampling and
    EPIC; rows finishing at different steps, so compaction too)."""
    cfg = epic_ort.GenerationConfig(max_new_tokens=30, seed=3, top_k=0, top_p=1.0, alpha=alpha, horizon=3)
    prompts = ["the cat", "a dog ran far", "x"]

    def run():
        return sorted((s.prompt_index, s.sample_index, s.token_ids, s.finish_reason)
                      for s in epic_ort.generate(tiny_llama, prompts, cfg, num_samples=2, batch_size=6))

    assert tiny_llama.kv_in_place
    in_place = run()
    assert len({len(r[2]) for r in in_place}) > 1  # rows finished at different steps
    _no_in_place(monkeypatch, tiny_llama)
    with_buffers = run()
    step = type(tiny_llama).step
    monkeypatch.setattr(type(tiny_llama), "step", lambda self, t, c, present_buffers=None: step(self, t, c))
    assert run() == with_buffers == in_place


def test_in_place_steps_write_into_the_room_and_forks_copy(tiny_llama):
    """A step writes its keys/values into the room after the cache (same buffers, nothing
    copied), leaves the cache's own slots alone, and gives the logits of a fresh prefill. Continuing
    the same cache a second time (a fork) copies it, so both continuations stay right; scratch
    (a lookahead's tokens) is overwritten instead."""
    model = tiny_llama
    a = model.encode("hello there")
    _, cache = model.prefill([a, a[:3]], room=4)
    assert cache.capacity == len(a) + 4
    before = [t.copy() for t in cache.tensors()]

    def fresh(tokens_row0, tokens_row1):
        _, c = model.prefill([a + tokens_row0[:-1], a[:3] + tokens_row1[:-1]])
        return model.step(np.array([tokens_row0[-1], tokens_row1[-1]]), c)[0]

    l1, c1 = model.step(np.array([5, 6]), cache)
    assert all(np.shares_memory(x, y) for x, y in zip(c1.values, cache.values))
    for x, y in zip(cache.tensors(), before):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(l1, fresh([5], [6]), atol=1e-4)
    l2, c2 = model.step(np.array([7, 8]), cache)  # a second continuation of `cache`: a fork
    assert not any(np.shares_memory(x, y) for x, y in zip(c2.values, cache.values))
    np.testing.assert_allclose(l2, fresh([7], [8]), atol=1e-4)
    l11, _ = model.step(np.array([9, 9]), c1)  # the first continuation is intact
    np.testing.assert_allclose(l11, fresh([5, 9], [6, 9]), atol=1e-4)

    _, s1 = model.forward(np.array([[10], [11]]), c2, scratch=True)  # scratch, then a real step over it
    l3, c3 = model.step(np.array([12, 12]), c2)
    assert all(np.shares_memory(x, y) for x, y in zip(c3.values, s1.values))
    np.testing.assert_allclose(l3, fresh([7, 12], [8, 12]), atol=1e-4)


def test_cache_grows_with_room_to_spare_and_compacts_in_place(tiny_llama):
    model = tiny_llama
    rows = [model.encode("the cat sat"), model.encode("a dog"), model.encode("x y z w")]
    _, cache = model.prefill(rows)  # no room asked for
    assert cache.capacity == cache.length
    _, grown = model.step(np.array([5, 6, 7]), cache)
    assert grown.capacity == cache.length + 1 + max(1, cache.length // 4)  # geometric, not a fixed slab
    _, nxt = model.step(np.array([8, 9, 10]), grown)
    assert all(np.shares_memory(x, y) for x, y in zip(nxt.values, grown.values))  # no second growth
    ref = nxt.select([0, 2])
    kept = nxt.compacted([0, 2])
    assert kept.capacity == nxt.capacity and all(np.shares_memory(x, y) for x, y in zip(kept.values, nxt.values))
    for x, y in zip(kept.tensors(), ref.tensors()):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(kept.attention_mask, ref.attention_mask)
    la, _ = model.step(np.array([11, 12]), kept)
    lb, _ = model.step(np.array([11, 12]), ref)
    np.testing.assert_allclose(la, lb, atol=1e-5)


def test_steps_on_the_same_buffers_reuse_one_io_binding(tiny_llama, monkeypatch):
    """An in-place step binds only its small inputs anew when the cache's buffers are the ones its
    binding already holds; growth, compaction and forks bring new buffers and a new binding. The
    logits are those of a fresh binding at every step."""
    from epic_ort.runtime import cache as runtime

    model = tiny_llama
    rows = [model.encode("the cat sat"), model.encode("a dog"), model.encode("x y z w")]

    def run():
        _, cache = model.prefill(rows, room=2)
        out, bindings = [], []
        for t in range(5):  # the third step outgrows the room
            if t == 4:
                cache = cache.compacted([0, 2])
            logits, cache = model.step(np.full(cache.rows, 5 + t), cache)
            out.append(logits)
            bindings.append(cache.bound.binding)
        return out, bindings

    reused, b = run()
    assert b[1] is b[0]  # same buffers: same binding
    assert b[2] is not b[1] and b[3] is b[2]  # grown: new buffers, new binding, then reused
    assert b[4] is not b[3]  # compacted: views of another shape
    monkeypatch.setattr(runtime._BoundBuffers, "holds", lambda self, values: False)
    fresh, b = run()
    assert len({id(x) for x in b}) == 5
    for x, y in zip(reused, fresh):
        np.testing.assert_array_equal(x, y)
