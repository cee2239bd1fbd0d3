"""alpha fitting: bisection recovers a known alpha; calibration files are validated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from epic_ort.calibration.calibrate import expected_entropy, fit_alpha, stratified_candidates
from epic_ort.calibration.store import read_calibration, resolve_auto_alpha, resolve_auto_temperature
from epic_ort.calibration.targets import FORMAT, calibrate
from epic_ort.errors import CalibrationError


def _synthetic(n_ctx=200, m=20, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(n_ctx, m))
    logq = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    h = rng.uniform(0, 12, size=(n_ctx, m))
    return list(logq), list(h)


@pytest.mark.parametrize("true_alpha", [-0.7, 0.0, 0.25, 1.5])
def test_bisection_recovers_known_alpha(true_alpha):
    logq, h = _synthetic()
    target = float(expected_entropy(true_alpha, logq, h).mean())
    assert fit_alpha(target, logq, h) == pytest.approx(true_alpha, abs=1e-5)


def test_expected_entropy_is_decreasing_in_alpha():
    logq, h = _synthetic(n_ctx=30)
    vals = [expected_entropy(a, logq, h).mean() for a in np.linspace(-3, 3, 25)]
    assert np.all(np.diff(vals) < 0)


def test_stratified_candidates_unbiased():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, size=300)
    logq = logits - np.log(np.exp(logits).sum())
    f = rng.uniform(0, 10, size=300)
    exact = float((np.exp(logq) * f).sum())
    est = []
    for s in range(2000):
        toks, logw = stratified_candidates(logq, 0.5, 8, 4, np.random.default_rng(s))
        est.append(float((np.exp(logw) * f[toks]).sum()))
    est = np.array(est)
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est))
    toks, logw = stratified_candidates(logq, 0.5, 8, 4, np.random.default_rng(0))
    assert np.exp(logw).sum() == pytest.approx(1.0)


def _tiny_corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    f.write_text("\n\n".join(" ".join(rng.choice(words, size=40)) + "." for _ in range(30)))
    return f


def _model_copy(tiny_exports, tmp_path):
    import shutil

    import epic_ort

    d = tmp_path / "model"
    shutil.copytree(tiny_exports["llama"]["onnx"], d)
    return d, epic_ort.load(d, provider="cpu")


LOOKAHEAD = dict(horizon=2, rollouts=1, contexts=24, context_tokens=16, seed=3)
ENTCE = dict(horizon=2, rollouts=1, contexts=12, context_tokens=16, new_tokens=12, passes=2, seed=3, target_contexts=12)


def test_calibrate_reproducible_and_written(tiny_exports, tmp_path):
    d, model = _model_copy(tiny_exports, tmp_path)
    corpus = _tiny_corpus(tmp_path)
    a = calibrate(model, [corpus], "lookahead", show_progress=False, **LOOKAHEAD)
    b = calibrate(model, [corpus], "lookahead", write=False, show_progress=False, **LOOKAHEAD)
    assert a["alpha"] == b["alpha"]
    assert a["alpha_se"] > 0
    assert abs(a["model_entropy"] - a["data_entropy"]) < 1e-3 or a["alpha_clipped"]
    on_disk = read_calibration(d)
    assert on_disk["alpha"] == a["alpha"] and on_disk["corpus"][0]["sha256"] and on_disk["target"] == "lookahead"
    assert not list(d.glob(".*tmp"))
    assert resolve_auto_alpha(model, 2, 1) == a["alpha"]
    with pytest.raises(CalibrationError, match="temperature"):
        resolve_auto_temperature(model, 2, 1)  # the lookahead target fits no temperature
    with pytest.raises(CalibrationError, match="horizon 2, rollouts 1"):
        resolve_auto_alpha(model, 3, 1)
    data = json.loads((d / "epic_calibration.json").read_text())
    data["model_sha256"] = "0" * 64
    (d / "epic_calibration.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="another model"):
        resolve_auto_alpha(model, 2, 1)
    (d / "epic_calibration.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="corrupt"):
        resolve_auto_alpha(model, 2, 1)


def test_entce_calibration_is_deterministic_and_an_old_file_is_replaced(tiny_exports, tmp_path, capsys):
    d, model = _model_copy(tiny_exports, tmp_path)
    corpus = _tiny_corpus(tmp_path)
    a = calibrate(model, [corpus], "entce", write=False, show_progress=False, **ENTCE)
    b = calibrate(model, [corpus], "entce", write=False, show_progress=False, **ENTCE)
    assert (a["alpha"], a["temperature"]) == (b["alpha"], b["temperature"])
    c = calibrate(model, [corpus], "entce", write=False, show_progress=False, **{**ENTCE, "seed": 4})
    assert (c["alpha"], c["temperature"]) != (a["alpha"], a["temperature"])  # the seed matters
    # a random model's plain samples surprise it far less than real words do: both knobs move towards
    # more surprise (alpha below 0, a hotter temperature)
    assert a["human_log_loss"] > a["epic_last_pass_surprisal"] and a["alpha"] < 0
    assert a["temperature"] > 1
    # a file of an older epic-ort (format 2, before target_contexts) is recalibrated with a one-line message, not used
    (d / "epic_calibration.json").write_text(json.dumps({"format": "epic-ort-calibration/2", "alpha": 9.0,
                                                         "alpha_se": 0.1, "horizon": 4, "rollouts": 2,
                                                         "model_sha256": model.manifest.model_sha256}))
    import epic_ort.calibration.store as store

    real = store.calibrate
    store.calibrate = lambda m, paths, target, **kw: real(m, [corpus], target, **{**kw, **ENTCE, "write": True})
    try:
        alpha = resolve_auto_alpha(model, 2, 1, show_progress=False)
    finally:
        store.calibrate = real
    err = capsys.readouterr().err
    assert "older epic-ort" in err and "recalibrating" in err
    assert alpha == a["alpha"] and read_calibration(d)["format"] == FORMAT


def _surprisal(model, contexts, config, batch=16):
    from epic_ort import scoring
    from epic_ort.decoding import generate

    samples = list(generate(model, prompt_ids=contexts, config=config, batch_size=batch))
    scored = scoring.score_continuations(model, [contexts[s.prompt_index] for s in samples],
                                         [s.token_ids for s in samples])
    per = np.array([nll.mean() for _, nll in scored])
    return per.mean(), per.std(ddof=1) / np.sqrt(per.size)


@pytest.mark.parametrize("knob,true_value", [("alpha", -1.5), ("temperature", 1.6)])
def test_closed_loop_moves_generations_to_the_target(tiny_exports, tmp_path, knob, true_value):
    """The target is the surprisal rate of the tiny model's own generations at a known knob value
    (a reachable target: a random model's log loss on real text is not). Fitted on some contexts and
    seeds, the knob brings generations from other contexts and fresh seeds closer to the target than
    plain sampling's, by more than the sampling error."""
    import epic_ort
    from epic_ort.calibration.closed_loop import ClosedLoopSettings, fit_knob
    from epic_ort.calibration.corpus import context_at, load_corpus, sample_positions
    from epic_ort.settings import GenerationConfig

    model = epic_ort.load(tiny_exports["llama"]["onnx"], provider="cpu")
    corpus = load_corpus(model, [_tiny_corpus(tmp_path)])
    positions = sample_positions(corpus, 72, 12, 16, 5)
    contexts = [context_at(corpus, int(p), 12) for p in positions]
    fit_ctx, held_ctx = contexts[:24], contexts[24:]
    lookahead = dict(horizon=2, rollouts=1)
    at = lambda value, seed: GenerationConfig(max_new_tokens=16, seed=seed, **lookahead, **{knob: value})  # noqa: E731
    target, _ = _surprisal(model, fit_ctx, at(true_value, 11))
    # a random model's surprisal moves little with alpha: steps as large as its slope needs
    fit = ClosedLoopSettings(contexts=24, new_tokens=16, passes=3, seed=1, alpha_max_step=0.1, **lookahead)
    result = fit_knob(model, fit_ctx, target, knob, fit, show_progress=False)
    held_target, _ = _surprisal(model, held_ctx, at(true_value, 12))
    s0, se0 = _surprisal(model, held_ctx, GenerationConfig(max_new_tokens=16, seed=13))
    s1, se1 = _surprisal(model, held_ctx, at(result[knob], 13))
    gap0, gap1 = abs(s0 - held_target), abs(s1 - held_target)
    print(f"{knob}: fitted {result[knob]:.3f} (true {true_value}), target {held_target:.3f}, plain {s0:.3f} ± {se0:.3f},"
          f" fitted {s1:.3f} ± {se1:.3f}")
    assert gap0 > 3 * se0  # plain sampling is off target, so there is something to correct
    assert gap1 < gap0 - 2 * np.hypot(se0, se1)
    assert np.sign(result[knob] - (0.0 if knob == "alpha" else 1.0)) == np.sign(true_value - (0.0 if knob == "alpha" else 1.0))


def test_the_entce_target_pools_more_human_passages_than_are_generated_from(tiny_exports, tmp_path):
    """The target is the log loss over all `target_contexts` human continuations (token-weighted);
    the contexts generated from are `contexts` of those passages, spread over the text."""
    import epic_ort
    from epic_ort.calibration.closed_loop import ClosedLoopSettings, human_log_loss
    from epic_ort.calibration.corpus import context_at, load_corpus, sample_positions
    from epic_ort.scoring import score_continuations

    model = epic_ort.load(tiny_exports["llama"]["onnx"], provider="cpu")
    corpus = load_corpus(model, [_tiny_corpus(tmp_path)])
    s = ClosedLoopSettings(contexts=5, context_tokens=12, new_tokens=10, target_contexts=40, seed=2)
    contexts, target = human_log_loss(model, corpus, s, show_progress=False)
    positions = sample_positions(corpus, 40, 12, 10, 2)
    every = [context_at(corpus, int(p), 12) for p in positions]
    assert len(contexts) == 5 and contexts[0] == every[0] and contexts[-1] == every[-1]
    assert all(c in every for c in contexts) and len({tuple(c) for c in contexts}) == 5
    nll = np.concatenate([n for _, n in score_continuations(
        model, every, [corpus.tokens[int(p): int(p) + 10].tolist() for p in positions])])
    assert target == pytest.approx(nll.mean(), rel=1e-9)
