"""alpha fitting: bisection recovers a known alpha; calibration files are validated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from epic_ort.calibration.calibrate import (
    CalibrationSettings,
    calibrate,
    expected_entropy,
    fit_alpha,
    stratified_candidates,
)
from epic_ort.calibration.store import read_calibration, resolve_auto_alpha
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


def test_calibrate_reproducible_and_written(tiny_exports, tmp_path):
    import shutil

    import epic_ort

    d = tmp_path / "model"
    shutil.copytree(tiny_exports["llama"]["onnx"], d)
    model = epic_ort.load(d, provider="cpu")
    corpus = _tiny_corpus(tmp_path)
    s = CalibrationSettings(horizon=2, rollouts=1, contexts=24, context_tokens=16, seed=3, bootstrap=100)
    a = calibrate(model, [corpus], s, show_progress=False)
    b = calibrate(model, [corpus], s, write=False, show_progress=False)
    assert a["alpha"] == b["alpha"]
    assert a["alpha_se"] > 0
    assert abs(a["model_entropy"] - a["data_entropy"]) < 1e-3 or a["alpha_clipped"]
    on_disk = read_calibration(d)
    assert on_disk["alpha"] == a["alpha"] and on_disk["corpus"][0]["sha256"]
    assert not list(d.glob(".*tmp"))
    assert resolve_auto_alpha(model, 2, 1) == a["alpha"]
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
