"""ε-, η-sampling, top-nσ and mirostat v2: the settings, the processors and chooser they build, and
every way in (Python API, CLI flags, JSONL requests, `evaluate --methods`).

Parity of ε and η with transformers is in tests/test_processors.py; top-nσ (llama.cpp) and mirostat
(llama.cpp) are checked against hand-computed values and, for mirostat, against its purpose: the
observed surprise is held at tau.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import epic_ort
from epic_ort.chooser import MirostatChooser, MirostatState, PlainChooser, Row
from epic_ort.cli.main import main
from epic_ort.decoding import make_chooser
from epic_ort.errors import InvalidRequestError
from epic_ort.evaluation.methods import parse_method, parse_methods, spec_help
from epic_ort.requests import parse_request
from epic_ort.sampling.mirostat import initial_mu, mirostat_v2_step, truncate
from epic_ort.sampling.truncation import TopNSigmaProcessor
from epic_ort.settings import GenerationConfig, describe_range, setting_fields

NEG = -np.inf


# ---------------------------------------------------------------------------------------------
# the settings table
# ---------------------------------------------------------------------------------------------

# name -> (default, range as the errors and --help say it, evaluate method key, CLI flag)
NEW_SETTINGS = {
    "top_n_sigma": (0.0, ">= 0", "top-n-sigma", "--top-n-sigma"),
    "epsilon_cutoff": (0.0, "in [0, 1)", "epsilon", "--epsilon-cutoff"),
    "eta_cutoff": (0.0, "in [0, 1)", "eta", "--eta-cutoff"),
    "mirostat_tau": (0.0, ">= 0", "mirostat", "--mirostat-tau"),
    "mirostat_eta": (0.1, "> 0", "mirostat-eta", "--mirostat-eta"),
}


def test_new_settings_are_declared_in_the_table():
    table = {f.name: (f, spec) for f, spec in setting_fields()}
    for name, (default, rng, method, _flag) in NEW_SETTINGS.items():
        f, spec = table[name]
        assert f.default == default and spec.kind == "float"
        assert describe_range(spec) == rng
        assert spec.method == method
        assert spec.help and "\n" not in spec.help and len(spec.help) < 160
    assert len(GenerationConfig().processors()) == 0  # all off by default
    assert not GenerationConfig().uses_mirostat


@pytest.mark.parametrize("values", [
    {"epsilon_cutoff": 1.0}, {"epsilon_cutoff": -1e-4}, {"eta_cutoff": 1.0}, {"eta_cutoff": -0.1},
    {"top_n_sigma": -0.5}, {"mirostat_tau": -1.0}, {"mirostat_eta": 0.0}, {"mirostat_eta": -0.1},
    {"eta_cutoff": "0.001"}, {"top_n_sigma": True}, {"mirostat_tau": float("nan")},
])
def test_new_settings_refuse_bad_values(values):
    with pytest.raises(InvalidRequestError, match=next(iter(values))):
        GenerationConfig().updated(values)


@pytest.mark.parametrize("values, match", [
    ({"mirostat_tau": 5.0, "greedy": True}, "greedy"),
    ({"mirostat_tau": 5.0, "alpha": 0.2}, "EPIC"),
    ({"mirostat_tau": 5.0, "alpha": "auto"}, "EPIC"),
])
def test_mirostat_refuses_greedy_and_epic(values, match):
    with pytest.raises(InvalidRequestError, match=f"mirostat.*{match}|{match}.*mirostat"):
        GenerationConfig().updated(values)
    GenerationConfig().updated({**values, "mirostat_tau": 0.0})  # fine without mirostat


def test_make_chooser_picks_mirostat():
    chooser = make_chooser(GenerationConfig(mirostat_tau=4.0, mirostat_eta=0.25, top_k=10))
    assert isinstance(chooser, MirostatChooser) and (chooser.tau, chooser.eta) == (4.0, 0.25)
    assert isinstance(make_chooser(GenerationConfig()), PlainChooser)
    assert isinstance(make_chooser(GenerationConfig(epsilon_cutoff=1e-3, top_n_sigma=1.0)), PlainChooser)
    assert type(make_chooser(GenerationConfig(alpha=0.3))).__name__ == "EpicChooser"
    # the processors before mirostat still run: the loop passes it the processed scores
    names = [type(p).__name__ for p in GenerationConfig(mirostat_tau=4.0, temperature=0.8, top_k=10).processors()]
    assert names == ["TemperatureProcessor", "TopKProcessor"]


# ---------------------------------------------------------------------------------------------
# top-nσ (llama.cpp's top_n_sigma), by hand
# ---------------------------------------------------------------------------------------------


def _kept(processor, row) -> list[bool]:
    x = np.array([row], dtype=np.float32)
    out = processor.apply(x)
    kept = np.isfinite(out)
    np.testing.assert_array_equal(out[kept], x[kept])  # survivors keep their logit
    return kept[0].tolist()


@pytest.mark.parametrize("n, kept", [
    # mean 0, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2, σ = 1.4142: cut = 2 - n·σ
    (1.0, [True, True, False, False, False, False]),  # cut 0.586
    (2.0, [True, True, True, False, False, False]),  # cut -0.828
    (2.5, [True, True, True, True, False, False]),  # cut -1.536
    (3.0, [True, True, True, True, True, False]),  # cut -2.243; -inf stays banned
])
def test_top_n_sigma_by_hand(n, kept):
    assert _kept(TopNSigmaProcessor(n), [2.0, 1.0, 0.0, -1.0, -2.0, NEG]) == kept


def test_top_n_sigma_boundary_and_banned_tokens():
    # mean 1.5, σ 1.5 exactly: with n = 2 the cut is 0.0 and "logit < cut" keeps the zeros
    assert _kept(TopNSigmaProcessor(2.0), [3.0, 3.0, 0.0, 0.0]) == [True] * 4
    assert _kept(TopNSigmaProcessor(1.0), [3.0, 3.0, 0.0, 0.0]) == [True, True, False, False]
    # -inf tokens are left out of the mean and σ (with them as a huge negative number, σ would
    # explode and everything would be kept)
    row = [2.0, 1.0, 0.0, -1.0, -2.0]
    assert _kept(TopNSigmaProcessor(1.0), row + [NEG] * 50)[:5] == [True, True, False, False, False]


def test_top_n_sigma_is_population_std_and_temperature_free():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 500)) * 2).astype(np.float32)
    x[1, :100] = NEG
    proc = TopNSigmaProcessor(1.5)
    for row in range(6):
        finite = x[row][np.isfinite(x[row])].astype(np.float64)
        expect = x[row] >= finite.max() - 1.5 * finite.std(ddof=0)
        np.testing.assert_array_equal(np.isfinite(proc.apply(x[row : row + 1]))[0], expect)
    kept = np.isfinite(proc.apply(x))
    assert 0 < kept[0].sum() < 100  # a real cut
    for t in (0.3, 2.0):  # max and σ scale alike with the temperature: the same tokens stay
        np.testing.assert_array_equal(np.isfinite(proc.apply(x / np.float32(t))), kept)
    chain = GenerationConfig(temperature=0.3, top_n_sigma=1.5).processors()
    np.testing.assert_array_equal(np.isfinite(chain.apply(x)), kept)


def test_top_n_sigma_edges():
    x = np.array([[0.5, -1.0, 2.0], [NEG, NEG, NEG], [NEG, 1.0, NEG], [4.0, 4.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(TopNSigmaProcessor(0.0).apply(x), x)  # 0: off
    out = TopNSigmaProcessor(0.5).apply(x)
    np.testing.assert_array_equal(out[1:], x[1:])  # all banned, one finite, all equal: unchanged
    assert out is not x and np.isfinite(out[0]).tolist() == [False, False, True]
    one = np.array([[3.0]], dtype=np.float32)
    np.testing.assert_array_equal(TopNSigmaProcessor(1.0).apply(one), one)


# ---------------------------------------------------------------------------------------------
# mirostat v2, by hand
# ---------------------------------------------------------------------------------------------


class _Uniforms:
    """A stand-in for a row's random stream that hands out preset uniforms."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def _row(rng, index: int = 0) -> Row:
    return Row(0, index, [1], rng)


PROBS = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])  # surprises 1, 2, 3, 4, 4 bits, exact in float32


def test_mirostat_truncation_and_mu_by_hand():
    """tau 1.5, eta 0.1, so mu starts at 3.0.
    step 1: keep surprise <= 3 (tokens 0-2; 3 == mu stays), renormalized 4/7, 2/7, 1/7; u 0.7 picks
            token 1, surprise log2(7/2) = 1.80735; mu = 3 - 0.1·(1.80735 - 1.5) = 2.969265
    step 2: mu < 3 drops token 2: 2/3, 1/3; u 0.1 picks token 0, surprise log2(3/2) = 0.584963;
            mu = 2.969265 + 0.1·(1.5 - 0.584963) = 3.060769
    step 3: tokens 0-2 again; u 0.95 picks token 2, surprise log2 7 = 2.807355; mu = 2.930033"""
    scores = np.log(PROBS).astype(np.float32)[None, :]
    chooser = MirostatChooser(tau=1.5, eta=0.1)
    row = _row(_Uniforms([0.7, 0.1, 0.95]))
    expect_tokens, expect_mu = [1, 0, 2], [2.969265, 3.0607688, 2.9300333]
    kept = [[True, True, True, False, False], [True, True, False, False, False], [True, True, True, False, False]]
    for step in range(3):
        mu = row.chooser_state.mu if row.chooser_state else initial_mu(1.5)
        assert np.isfinite(truncate(scores, np.array([mu])))[0].tolist() == kept[step]
        token = chooser.choose(None, [row], scores, scores, None).tokens  # type: ignore[arg-type]
        assert token.tolist() == [expect_tokens[step]]
        assert isinstance(row.chooser_state, MirostatState)
        assert row.chooser_state.mu == pytest.approx(expect_mu[step], rel=1e-6)


def test_mirostat_keeps_the_top_token_when_none_passes():
    scores = np.array([[np.log(0.25), np.log(0.5), np.log(0.5), NEG]], dtype=np.float32)  # -inf: banned
    # probabilities 0.2, 0.4, 0.4: the best's surprise, 1.32 bits, is above mu 0.5, so only the best
    # stays, the lowest id among the tied
    assert np.isfinite(truncate(scores, np.array([0.5])))[0].tolist() == [False, True, False, False]
    step = mirostat_v2_step(scores, np.array([0.5]), np.array([0.99]), tau=2.0, eta=0.5)
    assert step.tokens.tolist() == [1] and step.surprise[0] == 0.0  # renormalized to probability 1
    assert step.mu[0] == pytest.approx(0.5 + 0.5 * 2.0)  # too predictable: mu rises by eta·tau
    # a banned token is never kept, whatever mu
    assert not np.isfinite(truncate(scores, np.array([1e9])))[0, 3]


def test_mirostat_rows_are_independent():
    """A row's tokens and mu depend only on its own stream and scores, not on the rows beside it."""
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((3, 300)) * 2).astype(np.float32)
    chooser = MirostatChooser(tau=3.0, eta=0.2)
    together = [_row(np.random.default_rng([7, i]), i) for i in range(3)]
    alone = _row(np.random.default_rng([7, 1]), 1)
    for _ in range(30):
        both = chooser.choose(None, together, scores, scores, None).tokens  # type: ignore[arg-type]
        one = chooser.choose(None, [alone], scores[1:2], scores[1:2], None).tokens  # type: ignore[arg-type]
        assert both[1] == one[0]
    assert together[1].chooser_state.mu == alone.chooser_state.mu
    assert len({r.chooser_state.mu for r in together}) == 3


# ---------------------------------------------------------------------------------------------
# mirostat's purpose: the observed surprise is held at tau (statistical, fixed seeds)
# ---------------------------------------------------------------------------------------------

ZIPF = (-1.1 * np.log(np.arange(1, 2001))).astype(np.float32)  # entropy 7.30 bits


def _observed_surprise(tau: float, seed: int, rows: int = 8, steps: int = 1200) -> tuple[np.ndarray, list[float]]:
    """The surprise (bits) of each drawn token under the truncated, renormalized distribution, as the
    test computes it itself (float64, from the mu each row had before the step), and the final mus."""
    q = np.exp(ZIPF.astype(np.float64))
    q /= q.sum()
    bits = -np.log2(q)
    chooser = MirostatChooser(tau=tau, eta=0.1)
    batch = [_row(np.random.default_rng([seed, i]), i) for i in range(rows)]
    scores = np.tile(ZIPF, (rows, 1))
    out = []
    for _ in range(steps):
        mu = np.array([r.chooser_state.mu if r.chooser_state else 2 * tau for r in batch])
        tokens = chooser.choose(None, batch, scores, scores, None).tokens  # type: ignore[arg-type]
        keep = bits[None, :] <= mu[:, None]
        assert keep[np.arange(rows), tokens].all()  # never a token above mu
        out.append(bits[tokens] + np.log2((q[None, :] * keep).sum(axis=1)))
    return np.array(out), [r.chooser_state.mu for r in batch]


@pytest.mark.parametrize("tau, seed", [(2.0, 0), (5.0, 1)])
def test_mirostat_holds_the_surprise_at_tau(tau, seed):
    """Plain sampling from this distribution averages 7.30 bits of surprise; mirostat holds the mean
    at tau (seen: tau 2.0 -> 1.9993 (standard error 0.010), tau 5.0 -> 4.9987 (0.025), over 8 rows x
    1,100 steps after the first 100)."""
    surprise, mus = _observed_surprise(tau, seed)
    after = surprise[100:]  # mu settles within a few dozen steps from 2·tau
    se = after.std() / math.sqrt(after.size)
    assert abs(after.mean() - tau) < max(4 * se, 0.05)
    assert abs(surprise[-300:].mean() - tau) < 0.15  # and stays there
    # the truncation level settles above tau (the kept tokens' mean surprise is below the cut), and
    # stays bounded (seen: 4.8-5.6 for tau 2, 8.8-11.0 for tau 5)
    assert all(tau < mu < tau + 8 for mu in mus)


# ---------------------------------------------------------------------------------------------
# through generate (tiny model), the CLI, JSONL requests and evaluate's method specs
# ---------------------------------------------------------------------------------------------

# cut-offs large enough to change the tiny model's short samples (its next-token entropy is ~1.5 nats)
NEW_CONFIGS = {
    "eta": dict(eta_cutoff=0.05),
    "epsilon": dict(epsilon_cutoff=0.02),
    "top-n-sigma": dict(top_n_sigma=1.0),
    "mirostat": dict(mirostat_tau=2.0, mirostat_eta=0.2),
}


def _tokens(model, config: GenerationConfig, batch_size: int = 8, n: int = 3) -> dict[tuple[int, int], list[int]]:
    samples = epic_ort.generate(model, ["the cat", "a dog ran"], config, num_samples=n, batch_size=batch_size)
    return {(s.prompt_index, s.sample_index): s.token_ids for s in samples}


def test_mirostat_same_seed_same_tokens_whatever_the_batch(tiny_llama):
    config = GenerationConfig(mirostat_tau=2.0, temperature=0.9, max_new_tokens=16, seed=11)
    full = _tokens(tiny_llama, config, batch_size=8)
    assert len(full) == 6 and all(full.values())
    for batch_size in (1, 4):
        assert _tokens(tiny_llama, config, batch_size=batch_size) == full
    assert _tokens(tiny_llama, GenerationConfig(mirostat_tau=2.0, temperature=0.9, max_new_tokens=16, seed=12)) != full
    # the chooser really ran: plain sampling with the same seed gives other tokens
    assert _tokens(tiny_llama, GenerationConfig(temperature=0.9, max_new_tokens=16, seed=11)) != full


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _cli_flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), str(v))]


def test_cli_eta_cutoff_jsonl(tiny_exports, tiny_llama):
    r = run_cli("generate", tiny_exports["llama"]["onnx"], "the cat", "--eta-cutoff", "0.001", "--format", "jsonl",
                "--seed", "1")
    assert r.exit_code == 0, r.output
    (sample,) = [json.loads(line) for line in r.stdout.splitlines()]
    config = GenerationConfig(eta_cutoff=0.001, seed=1)
    assert sample["token_ids"] == next(iter(epic_ort.generate(tiny_llama, ["the cat"], config))).token_ids


@pytest.mark.parametrize("key", list(NEW_CONFIGS))
def test_cli_flags_reach_the_sampler(tiny_exports, tiny_llama, key):
    """Each new flag gives the tokens of the same settings through the API, which differ from plain
    sampling's."""
    values = NEW_CONFIGS[key]
    r = run_cli("generate", tiny_exports["llama"]["onnx"], "the cat", *_cli_flags(values), "--format", "jsonl",
                "--seed", "5", "--max-new-tokens", "10", "-n", "2")
    assert r.exit_code == 0, r.output
    got = [json.loads(line)["token_ids"] for line in r.stdout.splitlines()]
    api = [s.token_ids for s in epic_ort.generate(tiny_llama, ["the cat"], GenerationConfig(
        seed=5, max_new_tokens=10, **values), num_samples=2)]
    plain = [s.token_ids for s in epic_ort.generate(tiny_llama, ["the cat"], GenerationConfig(
        seed=5, max_new_tokens=10), num_samples=2)]
    assert got == api and got != plain


@pytest.mark.parametrize("bad", [
    ["--epsilon-cutoff", "1"], ["--eta-cutoff", "-0.1"], ["--top-n-sigma", "-1"], ["--mirostat-tau", "-1"],
    ["--mirostat-eta", "0"], ["--eta-cutoff", "x"], ["--mirostat-tau", "5", "--greedy"],
    ["--mirostat-tau", "5", "--alpha", "0.2"],
])
def test_cli_refuses_bad_values(tiny_exports, bad):
    r = run_cli("generate", tiny_exports["llama"]["onnx"], "hi", *bad)
    assert r.exit_code == 2 and "Traceback" not in r.output
    if "--greedy" in bad or "--alpha" in bad:
        assert "mirostat" in r.stderr


def test_cli_help_lists_the_new_flags():
    r = run_cli("generate", "--help")
    assert r.exit_code == 0
    for _, _, _, flag in NEW_SETTINGS.values():
        assert flag in r.output


def test_jsonl_requests_take_each_new_key(tiny_exports, tiny_llama, tmp_path):
    lines = [dict(prompt="the cat", seed=3, max_new_tokens=8, **v) for v in NEW_CONFIGS.values()]
    lines += [dict(prompt="the cat", mirostat_tau=3.0, alpha=0.2), dict(prompt="the cat", eta_cutoff=1.5)]
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run_cli("generate", tiny_exports["llama"]["onnx"], "--input", req)
    assert r.exit_code == 1  # the two bad lines fail, the others are served
    assert f"{req}:5: mirostat" in r.stderr and f"{req}:6: eta_cutoff" in r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["request_index"] for o in out] == [0, 1, 2, 3]
    for o, values in zip(out, NEW_CONFIGS.values()):
        config = GenerationConfig(seed=3, max_new_tokens=8, **values)
        assert o["token_ids"] == next(iter(epic_ort.generate(tiny_llama, ["the cat"], config))).token_ids
    defaults = GenerationConfig(top_k=20)
    parsed = parse_request({"prompt": "x", "top_n_sigma": 2, "mirostat_tau": 4}, 0, 1, defaults, 1, False)
    assert (parsed.config.top_n_sigma, parsed.config.mirostat_tau, parsed.config.top_k) == (2.0, 4.0, 20)


@pytest.mark.parametrize("spec, name, kwargs", [
    ("eta=0.0009", "eta=0.0009", {"eta_cutoff": 0.0009}),
    ("epsilon=0.0003", "epsilon=0.0003", {"epsilon_cutoff": 0.0003}),
    ("top-n-sigma=1.0", "top-n-sigma=1.0", {"top_n_sigma": 1.0}),
    ("top_n_sigma=2", "top-n-sigma=2", {"top_n_sigma": 2.0}),
    ("mirostat=5.0", "mirostat=5.0", {"mirostat_tau": 5.0}),
    ("mirostat=3+mirostat-eta=0.2", "mirostat=3+mirostat-eta=0.2", {"mirostat_tau": 3.0, "mirostat_eta": 0.2}),
    ("eta-cutoff=0.002", "eta=0.002", {"eta_cutoff": 0.002}),
    ("temperature=0.8+top-n-sigma=1.5", "temperature=0.8+top-n-sigma=1.5", {"temperature": 0.8, "top_n_sigma": 1.5}),
])
def test_method_specs_accept(spec, name, kwargs):
    assert parse_method(spec) == (name, kwargs)
    GenerationConfig(**kwargs).validate()


@pytest.mark.parametrize("spec", [
    "eta=1", "eta=-0.001", "eta=abc", "eta", "epsilon=1.5", "epsilon=0", "eta=0", "top-n-sigma=-1",
    "top-n-sigma=0", "top-n-sigma=inf", "mirostat=0", "mirostat=-5", "mirostat=x", "mirostat-eta=0.2",
    "mirostat=5+mirostat-eta=0", "mirostat=5+epic=0.2", "mirostat=5+epic", "mirostat=5+greedy",
    "mirostat=5+mirostat=4",
])
def test_method_specs_reject(spec):
    with pytest.raises(InvalidRequestError):
        parse_method(spec)


def test_method_help_and_lists():
    text = spec_help()
    for key in ("epsilon=VALUE", "eta=VALUE", "top-n-sigma=VALUE", "mirostat=VALUE"):
        assert key in text
    names = [n for n, _ in parse_methods("eta=0.0009, epsilon=0.0003, top-n-sigma=1.0, mirostat=5.0")]
    assert names == ["eta=0.0009", "epsilon=0.0003", "top-n-sigma=1.0", "mirostat=5.0"]
