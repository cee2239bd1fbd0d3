"""The OpenAI server over real HTTP (uvicorn on 127.0.0.1, started by the test) with the tiny Llama:
the `openai` client's answers equal offline `generate`; every settings-table field is accepted; bad
input gets its status and an OpenAI error body, and the server goes on answering."""

from __future__ import annotations

from dataclasses import fields

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from epic_ort import generate
from epic_ort.serving.launch import ServerProcess
from epic_ort.serving.schema import http_settings
from epic_ort.settings import GenerationConfig, default_of, setting_fields

KEY = "sk-test-key"
BODY_LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def server(tiny_exports):
    with ServerProcess(tiny_exports["llama"]["onnx"], "--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT),
                       "--max-running", "16") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


def offline_samples(model, prompts, config, n=1, chat=False):
    return sorted(generate(model, prompts, config, num_samples=n, chat=chat), key=lambda s: (s.prompt_index, s.sample_index))


def offline(model, prompts, config, n=1, chat=False):
    out = offline_samples(model, prompts, config, n, chat)
    return [s.text for s in out], [s.finish_reason for s in out]


def post(server, path, body, key=KEY, **kw):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def test_completions_match_offline(client, model_name, tiny_llama):
    r = client.completions.create(model=model_name, prompt="once upon a time", max_tokens=24, seed=3, n=2,
                                  temperature=0.8, top_p=0.9)
    samples = offline_samples(tiny_llama, ["once upon a time"], GenerationConfig(max_new_tokens=24, seed=3,
                                                                                 temperature=0.8, top_p=0.9), n=2)
    choices = sorted(r.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == [s.text for s in samples]
    assert r.usage.completion_tokens == sum(len(s.token_ids) for s in samples)
    assert r.usage.prompt_tokens == len(tiny_llama.encode("once upon a time"))
    assert [c.finish_reason for c in choices] == [{"eos": "stop"}.get(s.finish_reason, s.finish_reason) for s in samples]


def test_streamed_completions_with_stop_and_usage(client, model_name, tiny_llama):
    config = GenerationConfig(max_new_tokens=40, seed=5, stop=("e", "a"))
    stream = client.completions.create(model=model_name, prompt="the sea", max_tokens=40, seed=5, stop=["e", "a"],
                                       n=2, stream=True, stream_options={"include_usage": True})
    texts, usage = ["", ""], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    want, _ = offline(tiny_llama, ["the sea"], config, n=2)
    assert texts == want and not any("e" in t or "a" in t for t in texts)
    assert usage is not None and usage.prompt_tokens == len(tiny_llama.encode("the sea"))


def test_chat_streamed_and_not_match_offline(client, model_name, tiny_llama):
    messages = [{"role": "user", "content": "hello there"}]
    want, _ = offline(tiny_llama, ["hello there"], GenerationConfig(max_new_tokens=20, seed=9), n=2, chat=True)
    r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=20, seed=9, n=2)
    assert [c.message.content for c in r.choices] == want
    texts = ["", ""]
    for chunk in client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=20,
                                                seed=9, n=2, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == want


def test_epic_fields_and_prompt_lists_match_offline(client, model_name, tiny_llama):
    config = GenerationConfig(max_new_tokens=12, seed=2, alpha=0.7, horizon=2, rollouts=3)
    r = client.completions.create(model=model_name, prompt=["red fox", "blue sky"], max_tokens=12, seed=2, n=2,
                                  extra_body={"alpha": 0.7, "horizon": 2, "rollouts": 3})
    want, _ = offline(tiny_llama, ["red fox", "blue sky"], config, n=2)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want


def test_temperature_zero_is_greedy(client, model_name, tiny_llama):
    r = client.completions.create(model=model_name, prompt="abc", max_tokens=10, temperature=0)
    assert r.choices[0].text == offline(tiny_llama, ["abc"], GenerationConfig(max_new_tokens=10, greedy=True))[0][0]


def test_logprobs_and_logit_bias(client, model_name, tiny_llama):
    a = tiny_llama.encode("a", add_special_tokens=False)[0]
    r = client.completions.create(model=model_name, prompt="xyz", max_tokens=5, seed=1, logprobs=2,
                                  logit_bias={str(a): 100})
    c = r.choices[0]
    assert c.text == "aaaaa"
    assert c.logprobs.tokens == ["a"] * 5 and len(c.logprobs.token_logprobs) == 5
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       seed=1, logprobs=True, top_logprobs=2, presence_penalty=1.5, frequency_penalty=1)
    assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def _non_default(name, spec, default):
    """A valid value other than the default, from the setting's kind and range."""
    if spec.choices:
        return next(c for c in spec.choices if c != default)
    if spec.kind == "bool":
        return not default
    if spec.kind == "strings":
        return ["zz"]
    if spec.kind == "optional-int":
        return 7
    if spec.kind == "alpha":
        return 0.25
    if spec.kind == "int":
        return int(default) + 1
    if spec.kind == "float":
        lo = spec.low if spec.low is not None else 0.0
        hi = spec.high if spec.high is not None else lo + 2.0
        value = lo + (hi - lo) * 0.37
        return value if value != default else lo + (hi - lo) * 0.61
    raise AssertionError(f"unknown kind {spec.kind} of {name}")


def test_every_settings_table_field_is_accepted(server, tiny_llama):
    http = http_settings()
    assert {name for name, _ in http.values()} == {f.name for f in fields(GenerationConfig)}
    for f, spec in setting_fields():
        field_name = spec.http or f.name
        value = _non_default(f.name, spec, default_of(f))
        body = {"prompt": "hi", "max_tokens": 3, field_name: value}
        if field_name == "max_tokens":
            body[field_name] = 4
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, (field_name, value, r.text)
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


BAD = [
    ("bad json", b"{not json", 400, None),
    ("wrong type", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("wrong type n", {"prompt": "hi", "n": 1.5}, 400, "n"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("top_p 2", {"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("alpha banana", {"prompt": "hi", "alpha": "banana"}, 400, "alpha"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("no prompt", {"max_tokens": 2}, 400, "prompt"),
    ("prompt over the context", {"prompt": "abc " * 100}, 400, "prompt"),
    ("unknown field", {"prompt": "hi", "top_pp": 0.5}, 400, "top_pp"),
    ("empty messages", {"messages": []}, 400, "messages"),
]


@pytest.mark.parametrize("case, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(server, case, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"authorization": f"Bearer {KEY}",
                                                                 "content-type": "application/json"})
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in r.text


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_wrong_or_missing_key_is_401(server, key):
    r = post(server, "/v1/completions", {"prompt": "hi"}, key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_body_over_the_limit_is_413(server):
    r = post(server, "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 10)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: counted as it streams in
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 413


def test_unknown_model_is_404_and_the_server_still_answers(server, client, model_name):
    r = post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/nowhere").json()["error"]["code"] == "http_404"
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-epic-ort-replica"] == health.json()["replica"]
    assert client.completions.create(model=model_name, prompt="still here", max_tokens=3).choices[0].text is not None


def test_metrics_are_prometheus_text(server, client, model_name):
    client.completions.create(model=model_name, prompt="count me", max_tokens=4, seed=0)
    assert post(server, "/v1/completions", {"prompt": "hi", "top_k": -1}).status_code == 400
    text = httpx.get(server.url + "/metrics").text
    for name in ("epic_ort_requests_total", "epic_ort_generation_tokens_total", "epic_ort_queue_depth",
                 "epic_ort_running_rows", "epic_ort_time_to_first_token_seconds_bucket",
                 "epic_ort_inter_token_latency_seconds_bucket"):
        assert name in text, name
    assert 'epic_ort_requests_total{status="completed"}' in text
    assert 'epic_ort_requests_total{status="rejected_400"}' in text
    assert "epic_ort_running_rows 0.0" in text
