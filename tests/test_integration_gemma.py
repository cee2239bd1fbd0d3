"""The real Gemma 3 270M export (`epic-ort export gemma3-270m`, a Q4_K_M GGUF): greedy parity with
transformers at batch 1 and in a left-padded batch, logits past the 512-token sliding window at
prefill and cached steps, and EPIC's horizon-1 exactness against brute force over a 262k vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest

import epic_ort
from epic_ort.sampling.kernels import entropy, log_softmax

pytestmark = pytest.mark.integration

PROMPTS = [
    "The old lighthouse keeper looked out over the water and",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "In 1815, the Congress of Vienna",
]
NEW_TOKENS = 32
LONG_PREFILL = 640  # > the 512-token window: the local layers' windows cut into the prompt
LONG_STEPS = 6  # cached steps after it
LAST_PREFILL = 4  # prefill positions compared (the last ones: the window has moved the furthest)
EPIC_PROMPT = "My favourite thing to eat for breakfast is"
TOP_K = 1000  # the support EPIC samples from: brute force over it costs 1,000 tokens, not 262,144
EPIC_SAMPLES = 200  # per alpha, in one batch: one lookahead round evaluates what all rows need once


def _long_ids(model) -> list[int]:
    from epic_ort.calibration.corpus import load_corpus

    corpus = load_corpus(model)
    ids = list(corpus.bos) + corpus.tokens[: LONG_PREFILL + LONG_STEPS - len(corpus.bos)].tolist()
    assert len(ids) == LONG_PREFILL + LONG_STEPS
    return ids


@pytest.fixture(scope="module")
def hf_reference(gemma3, gemma3_dir):
    """transformers' greedy continuations and logits for this file's prompts, computed once per model
    export and transformers version and kept in the model folder (`.test-reference.json`, logits in
    `.test-reference-logits.npy`): loading the GGUF into transformers and its generate() are the slow
    part of this file."""
    transformers = pytest.importorskip("transformers")
    token_rows = [gemma3.encode(p) for p in PROMPTS]
    long_ids = _long_ids(gemma3)
    positions = list(range(LONG_PREFILL - LAST_PREFILL, LONG_PREFILL + LONG_STEPS))
    key = {"model": gemma3.manifest.model_sha256, "transformers": transformers.__version__, "rows": token_rows,
           "long": long_ids, "positions": positions, "new_tokens": NEW_TOKENS}
    path, logits_path = gemma3_dir / ".test-reference.json", gemma3_dir / ".test-reference-logits.npy"
    if path.is_file() and logits_path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return dict(cached, logits=np.load(logits_path))
    import torch
    from transformers import AutoModelForCausalLM

    from epic_ort.export.exporter import opened_source
    from epic_ort.fileio import write_json_atomic

    with opened_source("gemma3-270m") as src:
        hf = AutoModelForCausalLM.from_pretrained(src.path, torch_dtype=torch.float32, **src.kwargs).eval()
    with torch.no_grad():  # logits at the compared positions only (all 646 would be 680 MB)
        hidden = hf.model(input_ids=torch.tensor([long_ids])).last_hidden_state[0, positions]
        ref_logits = hf.lm_head(hidden).numpy()
    assert hf.config.final_logit_softcapping is None
    data = {"key": key, "greedy_1": [_hf_greedy(hf, [r])[0] for r in token_rows], "greedy_4": _hf_greedy(hf, token_rows)}
    np.save(logits_path, ref_logits.astype(np.float32))
    write_json_atomic(path, data)  # last: the pair counts only once both are written
    return dict(data, logits=ref_logits)


def _hf_greedy(hf, token_rows):
    import torch

    from epic_ort.runtime.model import left_pad

    eos = int(hf.config.eos_token_id)
    ids, mask = left_pad(token_rows, pad_id=0)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=eos)
    return [r[: r.index(eos) + 1] if eos in r else r for r in out[:, ids.shape[1]:].tolist()]


def test_export_is_the_lean_graph_with_the_q4_k_products_packed(gemma3):
    """The alias's tokenizer is SentencePiece's BPE (not transformers' Unigram reading of it), and
    the 27 Q4_K products (18 o_proj, 9 down_proj) are kept as their exact 4-bit blocks."""
    m = gemma3.manifest
    assert (m.graph, m.model_type, m.num_layers, m.vocab_size) == ("lean", "gemma3_text", 18, 262144)
    assert m.extra.get("packed_products") == 27
    assert gemma3.encode("Hello world") == [2, 9259, 1902]
    assert gemma3.decode(gemma3.encode(PROMPTS[2])) == PROMPTS[2]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_matches_transformers(gemma3, hf_reference, batch_size):
    token_rows = [gemma3.encode(p) for p in PROMPTS]
    assert len({len(r) for r in token_rows}) > 1  # different lengths: left padding is exercised
    cfg = epic_ort.GenerationConfig(max_new_tokens=NEW_TOKENS, greedy=True)
    ours = sorted(epic_ort.generate(gemma3, prompt_ids=token_rows, config=cfg, batch_size=batch_size),
                  key=lambda s: s.prompt_index)
    assert [s.token_ids for s in ours] == hf_reference[f"greedy_{batch_size}"]


def test_logits_past_the_window_match_transformers(gemma3, hf_reference):
    """A 640-token prompt (window 512) and cached steps after it: transformers' float32 logits up
    to rounding (the 4-bit products sum in another order)."""
    ids = _long_ids(gemma3)
    ref = np.asarray(hf_reference["logits"], dtype=np.float32)
    tol = 1e-4 * float(np.abs(ref).max())
    cols = np.arange(LONG_PREFILL - LAST_PREFILL, LONG_PREFILL)
    prefill, cache = gemma3.forward(np.array([ids[:LONG_PREFILL]]), gemma3.empty_cache(1, len(ids)),
                                    logits_at=(np.zeros(cols.size, dtype=np.int64), cols))
    np.testing.assert_allclose(prefill, ref[:LAST_PREFILL], rtol=0, atol=tol)
    for t in range(LONG_STEPS):  # token 640 + t at position 640 + t
        logits, cache = gemma3.step([ids[LONG_PREFILL + t]], cache)
        np.testing.assert_allclose(logits[0], ref[LAST_PREFILL + t], rtol=0, atol=tol)


def _brute_force_next_entropies(model, prompt_ids):
    """log q over the top-k support and Entropy(q(.|x, y)) for every y in it, by running every y on
    the prefix (100 at a time: 100 rows of 262k logits are 100 MB); q is the processed (top-k)
    distribution at both steps, as EPIC's lookahead sees it."""
    from epic_ort.settings import GenerationConfig

    procs = GenerationConfig(top_k=TOP_K).processors()
    logits, cache = model.prefill([prompt_ids])
    logq = log_softmax(procs.apply(logits))[0].astype(np.float64)
    support = np.flatnonzero(np.isfinite(logq))
    assert support.size >= TOP_K
    h = np.zeros(model.vocab_size)
    for chunk in np.array_split(support, -(-support.size // 100)):
        nxt, _ = model.step(chunk, cache.select(np.zeros(chunk.size, dtype=np.int64)))
        h[chunk] = entropy(procs.apply(nxt))
    h[list(model.eos_token_ids)] = 0.0
    return logq, h


@pytest.fixture(scope="module")
def brute(gemma3):
    ids = gemma3.encode(EPIC_PROMPT)
    return _brute_force_next_entropies(gemma3, ids)


@pytest.mark.parametrize("alpha", [2.0, -1.0])
def test_one_token_samples_follow_brute_force_q_alpha(gemma3, brute, alpha):
    from test_integration_epic import _chi2

    logq, h = brute
    cfg = epic_ort.GenerationConfig(max_new_tokens=1, alpha=alpha, horizon=1, rollouts=1, seed=11, top_k=TOP_K)
    samples = list(epic_ort.generate(gemma3, [EPIC_PROMPT], cfg, num_samples=EPIC_SAMPLES, batch_size=EPIC_SAMPLES))
    counts = np.bincount([s.token_ids[0] for s in samples], minlength=gemma3.vocab_size).astype(float)
    qa = logq - alpha * h
    qa = np.exp(qa - qa.max())
    qa /= qa.sum()
    q = np.exp(logq)
    p_qa, p_q = _chi2(counts, qa), _chi2(counts, q / q.sum())
    print(f"alpha={alpha}: p(q_a)={p_qa:.3g} p(q)={p_q:.3g} "
          f"mean evals={np.mean([s.stats['entropy_evals'] for s in samples]):.1f}")
    assert p_qa > 1e-3
    assert p_q < 1e-6
