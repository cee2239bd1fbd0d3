"""`epic-ort evaluate`: teacher-forced entropies, the text metrics, method specs, and a run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from epic_ort import scoring
from epic_ort.evaluation import diversity, metrics
from epic_ort.evaluation import DEFAULT_METHODS, evaluate, format_table, parse_method, parse_methods
from epic_ort.errors import InvalidRequestError
from epic_ort.sampling.kernels import entropy, log_softmax

TEXT = (
    "the cat sat on the mat. the dog ran to the park, and the bird sang a song! "
    "was it a good day? it was a very good day, said the old man to his son. "
    "we walk to the shop and buy some bread and milk. then we go home and eat. "
    "she reads a book by the fire while the rain falls on the roof. "
    "he likes to run in the morning when the air is cold and the sun is low. "
)


def test_entropy_and_nll_hand_computed_and_against_float64():
    logits = np.array([[0.0, np.log(3.0), -np.inf], [5.0, -np.inf, 5.0]], dtype=np.float32)
    h, nll = scoring.entropy_and_nll(logits, np.array([0, 2]))
    np.testing.assert_allclose(h, [-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), np.log(2.0)], atol=1e-7)
    np.testing.assert_allclose(nll, [np.log(4.0), np.log(2.0)], atol=1e-7)
    wide = (np.random.default_rng(0).standard_normal((6, 262144)) * 4).astype(np.float32)
    targets = np.arange(6) * 1000
    h, nll = scoring.entropy_and_nll(wide, targets)
    logq = log_softmax(wide.astype(np.float64))
    np.testing.assert_allclose(h, -(np.exp(logq) * logq).sum(-1), atol=1e-5)
    np.testing.assert_allclose(nll, -logq[np.arange(6), targets], atol=1e-5)


def _reference(model, prompt, cont):
    """Entropy and log-loss position by position, one prefill per prefix."""
    hs, nlls = [], []
    for t in range(len(cont)):
        logits, _ = model.prefill([prompt + cont[:t]])
        hs.append(float(entropy(logits)[0]))
        nlls.append(-float(log_softmax(logits.astype(np.float64))[0, cont[t]]))
    return np.array(hs), np.array(nlls)


def test_entropy_along_matches_prefix_by_prefix(tiny_llama):
    prompt = tiny_llama.encode("the cat sat on")
    cont = tiny_llama.encode(" the mat.", add_special_tokens=False)
    ref_h, ref_nll = _reference(tiny_llama, prompt, cont)
    h = scoring.entropy_along(tiny_llama, prompt, cont)
    h2, nll = scoring.entropy_and_logloss(tiny_llama, prompt, cont)
    assert h.shape == (len(cont),)
    np.testing.assert_allclose(h, ref_h, atol=1e-4)
    np.testing.assert_allclose(h2, ref_h, atol=1e-4)
    np.testing.assert_allclose(nll, ref_nll, atol=1e-4)


def test_batched_scoring_with_padding_matches_single_rows(tiny_llama):
    rows = [("the dog", " ran far"), ("a", " bird sang!"), ("it was a good day", "?"), ("we go", "")]
    prompts = [tiny_llama.encode(p) for p, _ in rows]
    conts = [tiny_llama.encode(c, add_special_tokens=False) for _, c in rows]
    batched = scoring.score_continuations(tiny_llama, prompts, conts, batch_size=3)
    for p, c, (h, nll) in zip(prompts, conts, batched):
        ref_h, ref_nll = _reference(tiny_llama, p, c)
        assert h.shape == nll.shape == (len(c),)
        np.testing.assert_allclose(h, ref_h, atol=1e-4)
        np.testing.assert_allclose(nll, ref_nll, atol=1e-4)


def test_distinct_n_and_repeated_ngrams_by_hand():
    s = [1, 2, 1, 2, 1, 2]
    assert diversity.distinct_n([s], 2) == pytest.approx(2 / 5)  # (1,2) (2,1) among 5
    assert diversity.distinct_n([s], 3) == pytest.approx(2 / 4)  # (1,2,1) (2,1,2) among 4
    assert diversity.repeated_ngram_fraction([s], 4) == pytest.approx(1 / 3)  # (1,2,1,2) again at the 3rd
    # pooled over samples: the second sample's bigrams are all seen in the first
    assert diversity.distinct_n([[1, 2, 3], [1, 2, 3]], 2) == pytest.approx(2 / 4)
    assert diversity.distinct_n([[1, 2, 3, 4, 5]], 2) == 1.0
    # rep-4 is within a sample, averaged over samples that have a 4-gram
    assert diversity.repeated_ngram_fraction([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7, 7], [1, 2]], 4) == pytest.approx(
        (0 + 2 / 3) / 2
    )
    assert np.isnan(diversity.distinct_n([[1]], 2))
    assert np.isnan(diversity.repeated_ngram_fraction([[1, 2, 3]], 4))


def test_entropy_rate_is_pooled_and_position_curve():
    per = [np.array([1.0, 1.0, 1.0, 1.0]), np.array([3.0])]
    assert metrics.entropy_rate(per) == pytest.approx(7 / 5)
    np.testing.assert_allclose(metrics.per_sample_means(per), [1.0, 3.0])
    c = metrics.position_curve([np.arange(8.0), np.arange(8.0) + 2, np.array([10.0])], 8, 4)
    assert c["edges"] == [0, 2, 4, 6, 8]
    np.testing.assert_allclose(c["mean"], [(0 + 1 + 2 + 3 + 10) / 5, (2 + 3 + 4 + 5) / 4, (4 + 5 + 6 + 7) / 4, (6 + 7 + 8 + 9) / 4])
    assert c["count"] == [5, 4, 4, 4]
    # more buckets than positions: one bucket per position
    assert metrics.position_curve([np.arange(3.0)], 3, 8)["mean"] == [0.0, 1.0, 2.0]


def test_rate_gap_bootstrap():
    rng = np.random.default_rng(1)

    def rows(n, shift):
        return [rng.normal(2.0 + shift, 1.0, size=20) for _ in range(n)]

    def run(n):
        human = rows(n, 0.0)
        method = [h + 0.3 + rng.normal(0, 0.5, size=20) for h in human]
        return metrics.rate_gap(method, human, n_boot=2000, seed=0)

    many, few = run(200), run(8)
    for ce in (many, few):
        assert ce["value"] == pytest.approx(abs(ce["diff"]))
        assert ce["lo"] <= ce["value"] <= ce["hi"]
        assert ce["diff_lo"] <= ce["diff"] <= ce["diff_hi"]
    assert (few["hi"] - few["lo"]) > (many["hi"] - many["lo"])
    assert many["value"] == pytest.approx(0.3, abs=0.1)
    # fixed seed: the same interval twice
    human = rows(10, 0.0)
    method = rows(10, 0.1)
    a = metrics.rate_gap(method, human, n_boot=500, seed=3)
    b = metrics.rate_gap(method, human, n_boot=500, seed=3)
    assert (a["lo"], a["hi"]) == (b["lo"], b["hi"])
    # identical texts: zero error, interval [0, 0]
    same = metrics.rate_gap(human, human, n_boot=200, seed=0)
    assert same["value"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0
    # no bootstrap: no interval
    assert metrics.rate_gap(method, human, n_boot=0)["lo"] is None
    with pytest.raises(ValueError):
        metrics.rate_gap(method[:3], human, n_boot=10)


def test_abs_gap_difference_is_paired_and_hand_computed():
    """Shifting every token of every passage by a constant shifts each pooled rate by it: a = human + 0.3,
    b = human − 0.1 is 0.3 − 0.1 = 0.2 farther from calibrated, with no doubt when paired, however much
    the passages differ."""
    rng = np.random.default_rng(8)
    human = [rng.uniform(2, 5) + rng.normal(0, 0.5, size=int(rng.integers(4, 30))) for _ in range(40)]
    d = metrics.abs_gap_difference([h + 0.3 for h in human], [h - 0.1 for h in human], human, n_boot=300, seed=0)
    assert d["diff"] == pytest.approx(0.2, abs=1e-12)
    assert d["lo"] == pytest.approx(0.2, abs=1e-9) and d["hi"] == pytest.approx(0.2, abs=1e-9)
    same = metrics.abs_gap_difference(human, human, human, n_boot=100, seed=0)
    assert same["diff"] == 0.0 and same["lo"] == 0.0 and same["hi"] == 0.0

    def noisy(shift, n):
        return [h + rng.normal(shift, 0.8, size=h.size) for h in human[:n]]

    clear = metrics.abs_gap_difference(noisy(0.5, 40), noisy(0.0, 40), human, n_boot=2000, seed=1)
    assert 0 < clear["lo"] <= clear["diff"] <= clear["hi"]  # 0.5 vs 0: told apart
    close = metrics.abs_gap_difference(noisy(0.02, 6), noisy(0.0, 6), human[:6], n_boot=2000, seed=1)
    assert close["lo"] < 0 < close["hi"]  # 0.02 vs 0 on 6 passages: not told apart
    with pytest.raises(ValueError):
        metrics.abs_gap_difference(human[:3], human, human)


@pytest.mark.parametrize(
    "spec, name, kwargs",
    [
        ("ancestral", "ancestral", {}),
        ("greedy", "greedy", {"greedy": True}),
        ("temperature=0.7", "temperature=0.7", {"temperature": 0.7}),
        ("top-k=50", "top-k=50", {"top_k": 50}),
        ("top_p=0.9", "top-p=0.9", {"top_p": 0.9}),
        ("Top-P = 0.95", "top-p=0.95", {"top_p": 0.95}),
        ("min-p=0.1", "min-p=0.1", {"min_p": 0.1}),
        ("typical-p=0.9", "typical-p=0.9", {"typical_p": 0.9}),
        ("epic", "epic", {"alpha": "auto"}),
        ("epic=auto", "epic", {"alpha": "auto"}),
        ("epic=0.15", "epic=0.15", {"alpha": 0.15}),
        ("epic=-0.5", "epic=-0.5", {"alpha": -0.5}),
        ("temperature=auto", "temperature=auto", {"temperature": "auto"}),
        ("temperature=0.7+top-k=50", "temperature=0.7+top-k=50", {"temperature": 0.7, "top_k": 50}),
    ],
)
def test_parse_method_accepts(spec, name, kwargs):
    assert parse_method(spec) == (name, kwargs)


@pytest.mark.parametrize(
    "spec",
    ["", "   ", "nucleus", "top-p", "top-p=", "top-p=abc", "top-p=0", "top-p=1.5", "top-k=0", "top-k=2.5",
     "temperature=0", "temperature=-1", "min-p=2", "typical-p=0", "epic=nan", "epic=inf", "epic=x",
     "greedy=1", "greedy+top-k=5", "ancestral+top-p=0.9", "top-p=0.9+top-p=0.8", "epic+epic=0.1"],
)
def test_parse_method_rejects(spec):
    with pytest.raises(InvalidRequestError):
        parse_method(spec)


def test_parse_methods_lists():
    assert [n for n, _ in parse_methods(None)] == list(DEFAULT_METHODS)
    assert [n for n, _ in parse_methods("ancestral, top-p=0.9")] == ["ancestral", "top-p=0.9"]
    with pytest.raises(InvalidRequestError, match="twice"):
        parse_methods(["top-p=0.9", "top_p=0.9"])
    with pytest.raises(InvalidRequestError):
        parse_methods(" , ")


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "\n\n") * 6, encoding="utf-8")
    return corpus


EVAL = dict(prompts=4, max_new_tokens=16, prompt_tokens=16, seed=0, horizon=2, rollouts=1, batch_size=3, buckets=4,
            n_boot=200, show_progress=False)


def test_evaluate_end_to_end(tiny_llama, tmp_path):
    corpus = _corpus(tmp_path)
    out = tmp_path / "eval"
    methods = ["ancestral", "top-k=5", "epic=0.5"]
    report = evaluate(tiny_llama, [corpus], methods, out_dir=out, **EVAL)
    for name in ("report.json", "report.md", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"] == report["methods"]
    assert [m["name"] for m in report["methods"]] == methods
    assert report["model"]["sha256"] == tiny_llama.manifest.model_sha256
    assert len(report["corpus"]["files"]) == 1 and len(report["corpus"]["files"][0]["sha256"]) == 64
    assert report["methods"][2]["alpha"] == 0.5 and report["methods"][2]["config"]["horizon"] == 2

    table = format_table(report)
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == len(methods) + 1
    assert body[-1].startswith("| **human**")
    assert table in (out / "report.md").read_text()

    # the human row is the base model's teacher-forced entropies and log losses, pooled
    from epic_ort.calibration.corpus import context_at, load_corpus

    c = load_corpus(tiny_llama, [corpus])
    hs, nlls = [], []
    for p in report["positions"]:
        prompt = context_at(c, p, 16)
        cont = c.tokens[p : p + 16].tolist()
        h, nll = scoring.entropy_and_logloss(tiny_llama, prompt, cont)
        np.testing.assert_allclose(h, scoring.entropy_along(tiny_llama, prompt, cont))
        hs.append(h)
        nlls.append(nll)
    assert report["human"]["entropy_rate"] == pytest.approx(float(np.concatenate(hs).mean()), abs=1e-6)
    assert report["human"]["log_loss"] == pytest.approx(float(np.concatenate(nlls).mean()), abs=1e-6)
    assert report["human"]["mean_tokens"] == 16

    for m in report["methods"]:
        ent = m["entce"]
        # EntCE: the method's own tokens' mean surprisal minus the human log loss, signed, CI around it
        assert ent["diff"] == pytest.approx(m["surprisal_rate"] - report["human"]["log_loss"], abs=1e-9)
        assert ent["value"] == pytest.approx(abs(ent["diff"])) and ent["diff_lo"] <= ent["diff"] <= ent["diff_hi"]
        gap = m["entropy_gap"]
        assert gap["diff"] == pytest.approx(m["entropy_rate"] - report["human"]["entropy_rate"], abs=1e-9)
        assert len(m["surprisal_curve"]) == 4 and len(m["entropy_curve"]) == 4
        assert 0 < m["mean_tokens"] <= 16
        assert 0 <= m["distinct_2"] <= 1 and 0 <= m["self_bleu"] <= 1
    assert sorted(m["entce_rank"] for m in report["methods"]) == [1, 2, 3]
    best = min(report["methods"], key=lambda m: m["entce"]["value"])
    assert "entce_vs_best" not in best
    for m in report["methods"]:
        if m is not best:
            vs = m["entce_vs_best"]
            assert vs["best"] == best["name"]
            assert vs["diff"] == pytest.approx(m["entce"]["value"] - best["entce"]["value"], abs=1e-9)
            assert vs["lo"] <= vs["diff"] <= vs["hi"]


def test_surprisal_rate_is_the_mean_surprisal_of_the_generated_tokens(tiny_llama, tmp_path):
    """Each method's surprisal rate, recomputed from its stored tokens by teacher forcing."""
    out = tmp_path / "eval"
    report = evaluate(tiny_llama, [_corpus(tmp_path)], ["top-k=5"], out_dir=out, **EVAL)
    (gen,) = [p for p in (out / "generations").glob("top-k=5.*.jsonl")]
    lines = [json.loads(line) for line in gen.read_text().splitlines()[1:]]
    from epic_ort.calibration.corpus import context_at, load_corpus

    c = load_corpus(tiny_llama, [_corpus(tmp_path)])
    nlls = [scoring.entropy_and_logloss(tiny_llama, context_at(c, report["positions"][o["index"]], 16), o["tokens"])[1]
            for o in lines]
    assert report["methods"][0]["surprisal_rate"] == pytest.approx(float(np.concatenate(nlls).mean()), abs=1e-5)


def test_evaluate_resumes_and_reuses(tiny_llama, tmp_path, monkeypatch):
    """An interrupted run resumes where it stopped and ends as an uninterrupted one; a rerun reuses
    every generation and score (no model call at all)."""
    corpus = _corpus(tmp_path)
    full = evaluate(tiny_llama, [corpus], ["ancestral", "epic=0.5"], out_dir=tmp_path / "full", **EVAL)
    part = tmp_path / "part"
    evaluate(tiny_llama, [corpus], ["ancestral", "epic=0.5"], out_dir=part, **EVAL)
    for f in (part / "generations").glob("*.jsonl"):  # as if killed: two passages done, a line cut off
        lines = f.read_text().splitlines()
        f.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    resumed = evaluate(tiny_llama, [corpus], ["ancestral", "epic=0.5"], out_dir=part, **EVAL)
    for a, b in zip(full["methods"], resumed["methods"]):
        assert a["surprisal_rate"] == pytest.approx(b["surprisal_rate"], abs=1e-6)
        assert a["distinct_3"] == b["distinct_3"]
    calls = tiny_llama.calls.calls
    again = evaluate(tiny_llama, [corpus], ["ancestral", "epic=0.5"], out_dir=part, **EVAL)
    assert tiny_llama.calls.calls == calls
    assert [m["surprisal_rate"] for m in again["methods"]] == [m["surprisal_rate"] for m in resumed["methods"]]
    moved = tmp_path / "elsewhere" / "same-text.txt"  # the text, not where it lies, keys the lines
    moved.parent.mkdir()
    moved.write_bytes(corpus.read_bytes())
    evaluate(tiny_llama, [moved], ["ancestral", "epic=0.5"], out_dir=part, **EVAL)
    assert tiny_llama.calls.calls == calls
    other = evaluate(tiny_llama, [corpus], ["ancestral"], out_dir=part, **{**EVAL, "max_new_tokens": 12})
    assert tiny_llama.calls.calls > calls  # other settings never read the stored lines
    assert other["methods"][0]["mean_tokens"] <= 12


def _stored_tokens(out_dir):
    return {f.name: {json.loads(line)["index"]: json.loads(line)["tokens"] for line in f.read_text().splitlines()[1:]}
            for f in sorted((out_dir / "generations").glob("*.jsonl"))}


def test_evaluate_grows_without_redoing_passages(tiny_llama, tmp_path):
    """More --prompts keep every earlier passage at its index: the larger run generates only the new
    ones and ends as a run of that size from scratch."""
    corpus = _corpus(tmp_path)
    methods = ["ancestral", "epic=0.5"]
    fresh = evaluate(tiny_llama, [corpus], methods, out_dir=tmp_path / "fresh", **{**EVAL, "prompts": 6})
    small = evaluate(tiny_llama, [corpus], methods, out_dir=tmp_path / "grown", **{**EVAL, "prompts": 3})
    assert small["positions"] == fresh["positions"][:3]
    before = tiny_llama.calls.calls
    grown = evaluate(tiny_llama, [corpus], methods, out_dir=tmp_path / "grown", **{**EVAL, "prompts": 6})
    grown_calls = tiny_llama.calls.calls - before
    before = tiny_llama.calls.calls
    evaluate(tiny_llama, [corpus], methods, out_dir=tmp_path / "again", **{**EVAL, "prompts": 6})
    assert grown_calls < tiny_llama.calls.calls - before
    assert grown["positions"] == fresh["positions"]
    assert len(set(fresh["positions"])) == 6
    assert _stored_tokens(tmp_path / "grown") == _stored_tokens(tmp_path / "fresh")
    for a, b in zip(fresh["methods"], grown["methods"]):
        assert a["surprisal_rate"] == pytest.approx(b["surprisal_rate"], abs=1e-6)


def test_judge_scores_every_row(tiny_llama, tiny_exports, tmp_path):
    import epic_ort
    from epic_ort.evaluation.judge import Judge

    judge = epic_ort.load(tiny_exports["gpt2"]["onnx"], provider="cpu")
    report = evaluate(tiny_llama, [_corpus(tmp_path)], ["ancestral", "top-k=3"], judge=judge,
                      out_dir=tmp_path / "j", **EVAL)
    assert report["judge"]["sha256"] == judge.manifest.model_sha256
    from epic_ort.calibration.corpus import context_at, load_corpus

    c = load_corpus(tiny_llama, [_corpus(tmp_path)])
    prompts = [tiny_llama.decode(context_at(c, p, 16)) for p in report["positions"]]
    human = [tiny_llama.decode(c.tokens[p: p + 16].tolist()) for p in report["positions"]]
    nll = np.concatenate(Judge(judge).log_losses(prompts, human))
    assert report["human"]["judge_perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-6)
    for m in report["methods"]:
        assert m["judge_perplexity"] > 1
    by_name = {m["name"]: m for m in report["methods"]}
    ratio = by_name["top-k=3"]["judge_vs_ancestral"]
    assert ratio["ratio"] == pytest.approx(by_name["top-k=3"]["judge_perplexity"] / by_name["ancestral"]["judge_perplexity"],
                                           rel=1e-9)
    assert ratio["lo"] <= ratio["ratio"] <= ratio["hi"]
    assert "judge_vs_ancestral" not in by_name["ancestral"]
    assert "judge ppl ÷ ancestral" in (tmp_path / "j" / "report.md").read_text()


def test_judge_ratio_is_paired_by_passage():
    """A method whose judge log loss is the anchor's plus 0.1 nats on every token of every passage is
    exp(0.1) times as perplexing, with no doubt at all once passages are paired, however much the
    passages differ from each other; unpaired, the passages' spread would widen the interval."""
    from epic_ort.evaluation.summary import judge_ratio

    rng = np.random.default_rng(4)
    anchor = [rng.uniform(1, 6) + rng.normal(0, 0.3, size=int(rng.integers(5, 40))) for _ in range(30)]
    shifted = [a + 0.1 for a in anchor]
    r = judge_ratio(shifted, anchor, n_boot=500, seed=0)
    assert r["ratio"] == pytest.approx(math.exp(0.1), rel=1e-12)
    assert r["lo"] == pytest.approx(math.exp(0.1), rel=1e-9) and r["hi"] == pytest.approx(math.exp(0.1), rel=1e-9)
    noisy = [a + rng.normal(0.1, 0.5, size=a.size) for a in anchor]
    r = judge_ratio(noisy, anchor, n_boot=500, seed=0)
    assert r["lo"] < r["ratio"] < r["hi"] and r["hi"] / r["lo"] > 1.01
    pooled = np.concatenate(noisy).mean() - np.concatenate(anchor).mean()
    assert r["ratio"] == pytest.approx(math.exp(pooled), rel=1e-9)


def test_judge_methods_limit_what_the_judge_scores(tiny_llama, tiny_exports, tmp_path):
    import epic_ort

    judge = epic_ort.load(tiny_exports["gpt2"]["onnx"], provider="cpu")
    report = evaluate(tiny_llama, [_corpus(tmp_path)], ["ancestral", "top-k=3"], judge=judge,
                      judge_methods=["top-k=3"], out_dir=tmp_path / "j", **EVAL)
    by_name = {m["name"]: m for m in report["methods"]}
    assert by_name["ancestral"]["judge_perplexity"] is None and by_name["top-k=3"]["judge_perplexity"] > 1
    assert report["human"]["judge_perplexity"] > 1
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "j" / "judge").iterdir()) == ["human", "top-k=3"]
    with pytest.raises(InvalidRequestError, match="top-p=0.5"):
        evaluate(tiny_llama, [_corpus(tmp_path)], ["ancestral"], judge=judge, judge_methods=["top-p=0.5"], **EVAL)


def test_self_bleu_hand_computed():
    a, b, c = [1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7, 8, 9, 10, 11]
    # a against {b, c}: unigrams 4/5, bigrams 3/4, trigrams 2/3, 4-grams 1/2, equal lengths (no penalty)
    bleu_a = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    # c shares nothing: every precision smoothed to 0.1 / count
    bleu_c = (0.1 / 5 * 0.1 / 4 * 0.1 / 3 * 0.1 / 2) ** 0.25
    assert diversity.self_bleu([a, b, c]) == pytest.approx((2 * bleu_a + bleu_c) / 3)
    assert diversity.self_bleu([a, a]) == pytest.approx(1.0)
    # clipping: a repeated token counts as often as the reference holding it most has it
    assert diversity.self_bleu([[5, 5, 5, 5], [5, 9, 9, 9]]) < diversity.self_bleu([[5, 5, 5, 5], [5, 5, 5, 5]])
    # brevity penalty against the closest reference length
    short = diversity.self_bleu([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert short < 1.0
    assert np.isnan(diversity.self_bleu([[1, 2, 3]]))


def test_evaluate_refuses_contexts_longer_than_the_model(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4, encoding="utf-8")
    with pytest.raises(InvalidRequestError, match="context"):
        evaluate(tiny_llama, [corpus], ["ancestral"], prompts=2, max_new_tokens=100, prompt_tokens=100,
                 show_progress=False)
    with pytest.raises(InvalidRequestError, match="unknown method"):
        evaluate(tiny_llama, [corpus], ["nucleus=0.9"], prompts=2, max_new_tokens=8, prompt_tokens=8,
                 show_progress=False)
