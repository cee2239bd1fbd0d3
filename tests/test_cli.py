"""The `epic-ort` command line on the tiny exports."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from epic_ort.cli.main import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def jsonl(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_generate_jsonl_fields_and_seed(tiny_exports):
    d = tiny_exports["llama"]["onnx"]
    args = ["generate", d, "hello world", "a cat", "-n", "2", "--max-new-tokens", "12", "--format", "jsonl", "--top-k", "20"]
    a = jsonl(run(*args, "--seed", "3"))
    b = jsonl(run(*args, "--seed", "3", "--batch-size", "1"))
    c = jsonl(run(*args, "--seed", "4"))
    key = lambda s: (s["prompt_index"], s["sample_index"])  # noqa: E731
    assert len(a) == 4
    for s in a:
        assert set(s) >= {"prompt_index", "sample_index", "text", "token_ids", "finish_reason", "stats"}
        assert s["finish_reason"] in ("eos", "stop", "length")
        assert 1 <= s["stats"]["tokens"] == len(s["token_ids"]) <= 12
        assert s["stats"]["seconds"] >= 0
    assert sorted(a, key=key) == [dict(x, stats=y["stats"]) for x, y in zip(sorted(b, key=key), sorted(a, key=key))]
    assert [s["token_ids"] for s in sorted(a, key=key)] != [s["token_ids"] for s in sorted(c, key=key)]


def test_text_mode_streams_single_prompt(tiny_exports):
    d = tiny_exports["gpt2"]["onnx"]
    r = run("generate", d, "the", "--max-new-tokens", "8", "--seed", "1")
    assert r.exit_code == 0
    j = jsonl(run("generate", d, "the", "--max-new-tokens", "8", "--seed", "1", "--format", "jsonl"))
    assert r.stdout == j[0]["text"] + "\n"


def test_stop_string_cuts_text(tiny_exports):
    d = tiny_exports["llama"]["onnx"]
    samples = jsonl(run("generate", d, "abc", "-n", "6", "--max-new-tokens", "40", "--seed", "0", "--stop", "e",
                        "--format", "jsonl"))
    stopped = [s for s in samples if s["finish_reason"] == "stop"]
    assert stopped, "with 6 samples of 40 chars some should contain 'e'"
    assert all("e" not in s["text"] for s in stopped)


def test_prompt_file_and_chat(tiny_exports, tmp_path):
    d = tiny_exports["llama"]["onnx"]
    f = tmp_path / "prompts.txt"
    f.write_text("one\n\ntwo\nthree\n")
    samples = jsonl(run("generate", d, "--prompt-file", f, "--max-new-tokens", "3", "--format", "jsonl", "--chat",
                        "--seed", "1"))
    assert sorted(s["prompt_index"] for s in samples) == [0, 1, 2]


@pytest.mark.parametrize("bad", [
    ["--max-new-tokens", "0"], ["--top-p", "1.5"], ["--top-p", "0"], ["--top-k", "-1"], ["--temperature", "0"],
    ["--alpha", "lots"], ["--horizon", "0"], ["--rollouts", "0"], ["--provider", "tpu"],
])
def test_bad_options_are_usage_errors(tiny_exports, bad):
    r = run("generate", tiny_exports["llama"]["onnx"], "hi", *bad)
    assert r.exit_code == 2
    assert "Traceback" not in r.output


def test_bad_model_folder_one_line_error(tmp_path):
    r = run("generate", tmp_path / "nope", "hi")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("generate", tmp_path / "empty", "hi")
    assert r.exit_code == 2 and "not an epic-ort export" in r.stderr


def test_cuda_unavailable_is_clear(tiny_exports):
    r = run("generate", tiny_exports["llama"]["onnx"], "hi", "--provider", "cuda")
    assert r.exit_code == 2 and "onnxruntime-gpu" in r.stderr


def test_export_refuses_existing_folder(tiny_exports):
    r = run("export", tiny_exports["llama"]["hf"], tiny_exports["llama"]["onnx"])
    assert r.exit_code == 2 and "--force" in r.stderr


def _requests(tmp_path, n=2):
    f = tmp_path / "req.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"the cat {i}", "max_new_tokens": 3, "seed": i}) + "\n" for i in range(n)))
    return f


def test_output_never_destroys_results_unless_asked(tiny_exports, tmp_path):
    d, req = tiny_exports["llama"]["onnx"], _requests(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text('{"precious": true}\n')
    r = run("generate", d, "--input", req, "--output", out)
    assert r.exit_code == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert out.read_text() == '{"precious": true}\n'
    r = run("generate", d, "--input", req, "--output", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["request_index"] for line in out.read_text().splitlines()] == [0, 1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run("generate", d, "--input", req, "--output", empty).exit_code == 0  # nothing to lose
    assert run("generate", d, "--input", req, "--output", out, "--overwrite", "--resume").exit_code == 2


def test_resume_says_what_it_skips(tiny_exports, tmp_path):
    d, req = tiny_exports["llama"]["onnx"], _requests(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    assert run("generate", d, "--input", req, "--output", out).exit_code == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n")
    r = run("generate", d, "--input", req, "--output", out, "--resume")
    assert r.exit_code == 0, r.output
    assert "1 of 3 request(s) already complete, 2 to run" in r.stderr
    strip = lambda text: sorted(json.dumps(dict(o, stats=None)) for o in map(json.loads, text.splitlines()))  # noqa: E731
    assert strip(out.read_text()) == strip("\n".join(lines))


def test_prompt_from_stdin(tiny_exports):
    d = tiny_exports["llama"]["onnx"]
    args = ["generate", str(d), "--max-new-tokens", "6", "--seed", "2", "--format", "jsonl"]
    piped = CliRunner().invoke(main, args, input="the cat sat\n", catch_exceptions=False)
    given = CliRunner().invoke(main, args + ["the cat sat"], catch_exceptions=False)
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["token_ids"] == json.loads(given.stdout)["token_ids"]
    empty = CliRunner().invoke(main, args, input="", catch_exceptions=False)
    assert empty.exit_code == 2 and "empty" in empty.stderr and empty.stderr.count("\n") == 1


def test_prompt_that_looks_like_a_flag_value_warns(tiny_exports):
    r = run("generate", tiny_exports["llama"]["onnx"], "the cat", ",", "--stop", ".", "--max-new-tokens", "2")
    assert r.exit_code == 0
    assert "warning: prompt 1 is ','" in r.stderr and "--stop" in r.stderr
    quiet = run("generate", tiny_exports["llama"]["onnx"], "the cat", "a dog", "--max-new-tokens", "2")
    assert "warning" not in quiet.stderr


def test_evaluate_help_lists_the_default_methods():
    from epic_ort.evaluation import DEFAULT_METHODS

    text = " ".join(run("evaluate", "--help").output.split())
    listed = text.split("[default: epic,", 1)[1].split("]", 1)[0]
    assert [m.strip() for m in ("epic," + listed).split(",")] == list(DEFAULT_METHODS)
