"""The server on the real SmolLM2 export, through the openai client: chat (streamed) and an EPIC
completion, each equal to offline `generate` with the same settings and seed."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from epic_ort import generate
from epic_ort.serving.launch import ServerProcess
from epic_ort.settings import GenerationConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(smollm2_dir):
    with ServerProcess(smollm2_dir, "--max-running", "8") as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_chat_stream_equals_offline(client, smollm2):
    question = "What is the capital of France?"
    text = ""
    for chunk in client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": question}],
                                                max_tokens=16, seed=0, temperature=0.7, stream=True):
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    want = next(generate(smollm2, [question], GenerationConfig(max_new_tokens=16, seed=0, temperature=0.7), chat=True))
    assert text == want.text and text.strip()


def test_epic_completions_equal_offline(client, smollm2):
    prompt = "It was a dark and stormy night"
    r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, seed=3, n=2,
                                  extra_body={"alpha": 0.2, "horizon": 4, "rollouts": 2})
    config = GenerationConfig(max_new_tokens=12, seed=3, alpha=0.2)
    want = sorted(generate(smollm2, [prompt], config, num_samples=2), key=lambda s: s.sample_index)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [s.text for s in want]
