"""Chat prompts are the ids transformers' apply_chat_template(tokenize=True) gives: the template's own
special tokens, none added on top, and the tokenizer's real special-token strings in the template."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import epic_ort
from epic_ort.cli.main import main
from epic_ort.decoding import encode_prompts

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what now?"},
]


def _hf_ids(hf_dir, messages):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_chat_ids_equal_transformers(tiny_exports, kind):
    pytest.importorskip("transformers")
    d = tiny_exports[kind]
    model = epic_ort.load(d["onnx"], provider="cpu")
    one = [{"role": "user", "content": "a cat sat"}]
    assert model.encode_chat("a cat sat") == _hf_ids(d["hf"], one)
    assert model.encode_chat(CONVERSATION) == _hf_ids(d["hf"], CONVERSATION)
    # what generate(chat=True) decodes from
    assert encode_prompts(model, ["a cat sat"], chat=True, truncate="error") == [_hf_ids(d["hf"], one)]


def test_template_sees_the_real_bos_token(tiny_exports, tmp_path):
    """A template that writes {{ bos_token }} itself (Llama 3, Gemma) gets '<s>', once."""
    pytest.importorskip("transformers")
    src = tiny_exports["llama"]
    hf = tmp_path / "hf"
    shutil.copytree(src["hf"], hf)
    onnx = tmp_path / "onnx"
    shutil.copytree(src["onnx"], onnx)
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    for folder in (hf,):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    manifest = json.loads((onnx / "epic_ort_manifest.json").read_text())
    manifest["chat_template"] = template
    (onnx / "epic_ort_manifest.json").write_text(json.dumps(manifest))
    model = epic_ort.load(onnx, provider="cpu")
    ids = model.encode_chat("hi")
    assert ids == _hf_ids(hf, [{"role": "user", "content": "hi"}])
    assert ids.count(1) == 1 and ids[0] == 1


def test_jsonl_chat_request_uses_the_chat_ids(tiny_exports, tmp_path):
    """`generate --input` with "chat": true prompts the model with the template's ids."""
    pytest.importorskip("transformers")
    d = tiny_exports["llama"]
    requests = tmp_path / "req.jsonl"
    requests.write_text(json.dumps({"prompt": "a cat sat", "chat": True, "max_new_tokens": 2, "seed": 0}) + "\n"
                        + json.dumps({"prompt": "a cat sat", "max_new_tokens": 2, "seed": 0}) + "\n")
    r = CliRunner().invoke(main, ["generate", str(d["onnx"]), "--input", str(requests)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda o: o["request_index"])
    hf = _hf_ids(d["hf"], [{"role": "user", "content": "a cat sat"}])
    model = epic_ort.load(d["onnx"], provider="cpu")
    assert rows[0]["stats"]["prompt_tokens"] == len(hf)
    assert rows[1]["stats"]["prompt_tokens"] == len(model.encode("a cat sat"))


def test_bad_messages_are_invalid_requests(tiny_llama):
    with pytest.raises(epic_ort.InvalidRequestError):
        tiny_llama.encode_chat([])
    with pytest.raises(epic_ort.InvalidRequestError):
        tiny_llama.encode_chat([{"role": "user"}])
