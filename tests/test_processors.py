"""Tests for epic_ort.sampling.processors: parity with transformers' warpers, and invariants.

The parity tests run the NumPy processors and the transformers 4.57 warpers on the same logits and
require the same banned (-inf) positions and the same surviving values. One allowance: torch.sort is
not stable on CPU, so when a cut-off falls inside a block of *equal* logits transformers drops an
arbitrary member of the block while we drop the highest token ids. For those cases (top-p, and the
`min_tokens_to_keep` rescue of min-p / typical) the check is that the positions that differ are tied
logits and that every block of equal logits loses the same number of tokens in both; everywhere else
the -inf mask must be identical.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epic_ort.sampling.processors import (
    MinPProcessor,
    ProcessorList,
    TemperatureProcessor,
    TopKProcessor,
    TopPProcessor,
    TypicalProcessor,
)
from epic_ort.sampling.kernels import softmax
from epic_ort.sampling.truncation import EpsilonProcessor, EtaProcessor, TopNSigmaProcessor
from epic_ort.settings import GenerationConfig

def build_processors(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                     eta_cutoff=0.0, top_n_sigma=0.0):
    """The processors the settings table builds for these settings (GenerationConfig.processors)."""
    try:
        return GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
                                top_n_sigma=top_n_sigma).processors()
    except Exception as e:  # the table refuses values out of range up front: as the processors do
        raise ValueError(str(e)) from None


SEEDS = (0, 1, 2)
VOCABS = (64, 1000)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _hf():
    """transformers' logits_process module and torch, or skip the test."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.generation import logits_process

    return torch, logits_process


def make_logits(seed: int, vocab: int) -> np.ndarray:
    """[4, vocab] float32 logits: plain, with -inf, with heavy ties, with ties and -inf."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(1.0, 4.0)
    x = rng.standard_normal((4, vocab)) * scale
    # row 1: a quarter of the vocabulary already banned
    x[1, rng.choice(vocab, vocab // 4, replace=False)] = -np.inf
    # row 2: only six distinct values, each repeated many times (the maximum is tied too)
    x[2] = rng.choice(rng.standard_normal(6) * scale, size=vocab)
    # row 3: some values repeated (including the row max) plus banned tokens
    x[3, rng.choice(vocab, vocab // 5, replace=False)] = x[3].max()
    x[3, rng.choice(vocab, vocab // 5, replace=False)] = x[3, 0]
    x[3, rng.choice(vocab, vocab // 5, replace=False)] = -np.inf
    return x.astype(np.float32)


def run_hf(warper, scores: np.ndarray) -> np.ndarray:
    torch, _ = _hf()
    ids = torch.zeros((scores.shape[0], 3), dtype=torch.long)
    return warper(ids, torch.from_numpy(scores.copy())).numpy()


def run_ours(processor, scores: np.ndarray) -> np.ndarray:
    ids = np.zeros((scores.shape[0], 3), dtype=np.int64)
    before = scores.copy()
    out = processor(ids, scores)
    np.testing.assert_array_equal(scores, before)  # the input is never modified
    assert out is not scores or (isinstance(processor, ProcessorList) and not len(processor))
    return out


def assert_same_filter(ours: np.ndarray, theirs: np.ndarray, scores: np.ndarray, ties_may_differ: bool) -> None:
    assert ours.shape == theirs.shape == scores.shape
    assert ours.dtype == np.float32
    assert not np.isnan(ours).any()
    banned_ours, banned_theirs = np.isneginf(ours), np.isneginf(theirs)
    both_kept = ~banned_ours & ~banned_theirs
    np.testing.assert_allclose(ours[both_kept], theirs[both_kept], rtol=1e-6)
    if not ties_may_differ:
        np.testing.assert_array_equal(banned_ours, banned_theirs)
        return
    for row in range(scores.shape[0]):
        differ = banned_ours[row] != banned_theirs[row]
        if not differ.any():
            continue
        values, block, counts = np.unique(scores[row], return_inverse=True, return_counts=True)
        assert (counts[block][differ] > 1).all(), f"row {row}: a non-tied token was filtered differently"
        np.testing.assert_array_equal(
            np.bincount(block, weights=banned_ours[row], minlength=len(values)),
            np.bincount(block, weights=banned_theirs[row], minlength=len(values)),
            err_msg=f"row {row}: a block of equal logits lost a different number of tokens",
        )


# (id, our processor, transformers warper factory, ties_may_differ)
def _cases():
    cases = []
    for t in (0.5, 1.3):
        cases.append((f"temperature={t}", TemperatureProcessor(t), lambda L, t=t: L.TemperatureLogitsWarper(t), False))
    for m in (1, 3):
        for k in (1, 5, 50):
            cases.append(
                (f"top_k={k}-keep{m}", TopKProcessor(k, m), lambda L, k=k, m=m: L.TopKLogitsWarper(k, min_tokens_to_keep=m), False)
            )
        for p in (0.1, 0.5, 0.9, 0.99, 1.0):
            cases.append(
                (f"top_p={p}-keep{m}", TopPProcessor(p, m), lambda L, p=p, m=m: L.TopPLogitsWarper(p, min_tokens_to_keep=m), True)
            )
        for p in (0.05, 0.2, 1.0):
            cases.append(
                (f"min_p={p}-keep{m}", MinPProcessor(p, m), lambda L, p=p, m=m: L.MinPLogitsWarper(p, min_tokens_to_keep=m), m > 1)
            )
        for p in (0.2, 0.9):
            cases.append(
                (f"typical={p}-keep{m}", TypicalProcessor(p, m), lambda L, p=p, m=m: L.TypicalLogitsWarper(p, min_tokens_to_keep=m), m > 1)
            )
        # epsilon/eta spare the top min_tokens_to_keep with every tie of the last one: no sort, so
        # the masks must match exactly
        for e in (3e-4, 1e-3, 0.01, 0.05):
            cases.append(
                (f"epsilon={e}-keep{m}", EpsilonProcessor(e, m), lambda L, e=e, m=m: L.EpsilonLogitsWarper(e, min_tokens_to_keep=m), False)
            )
        for e in (3e-4, 2e-3, 0.05, 0.5):
            cases.append(
                (f"eta={e}-keep{m}", EtaProcessor(e, m), lambda L, e=e, m=m: L.EtaLogitsWarper(e, min_tokens_to_keep=m), False)
            )
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# parity with transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_with_transformers(case, vocab):
    _, L = _hf()
    _, ours_proc, make_theirs, ties_may_differ = case
    theirs_proc = make_theirs(L)
    for seed in SEEDS:
        scores = make_logits(seed, vocab)
        ours = run_ours(ours_proc, scores)
        theirs = run_hf(theirs_proc, scores)
        assert_same_filter(ours, theirs, scores, ties_may_differ)
        if not isinstance(ours_proc, TemperatureProcessor):
            # a filter only bans tokens: every survivor keeps its exact logit
            kept = np.isfinite(ours)
            np.testing.assert_array_equal(ours[kept], scores[kept])


def test_parity_cases_actually_filter():
    """Guard against a vacuous parity test: the chosen settings ban tokens, and not always all."""
    scores = make_logits(0, 1000)
    for name, proc, _, _ in CASES:
        if name.startswith(("temperature", "top_p=1.0", "min_p=0.05")):
            continue
        out = run_ours(proc, scores)
        newly_banned = np.isneginf(out) & np.isfinite(scores)
        assert newly_banned[0].any(), name


def test_top_p_one_drops_underflowing_tokens_like_transformers():
    """transformers' top_p=1.0 still bans tokens whose float32 probability underflows to 0."""
    scores = np.array([[0.0, -200.0, -50.0, -np.inf, 1.0]], dtype=np.float32)
    ours = run_ours(TopPProcessor(1.0), scores)
    _, L = _hf()
    theirs = run_hf(L.TopPLogitsWarper(1.0), scores)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    np.testing.assert_array_equal(np.isneginf(ours), [[False, True, False, True, False]])


@pytest.mark.parametrize(
    "ours, make_theirs, kept",
    [
        # ascending cumulative 0.125, 0.25, 0.5, 1.0; "<= 1 - top_p" bans the 0.25 point too
        (TopPProcessor(0.75), lambda L: L.TopPLogitsWarper(0.75), [True, True, False, False]),
        # threshold 0.5 * 0.5 = 0.25 exactly: "probs < threshold" keeps the 0.25 token
        (MinPProcessor(0.5), lambda L: L.MinPLogitsWarper(0.5), [True, True, False, False]),
        # typical ranking is token 1 (p .25), token 0 (.5), then 2, 3; "cum < mass" stops at 0.25
        (TypicalProcessor(0.25), lambda L: L.TypicalLogitsWarper(0.25), [False, True, False, False]),
        (TypicalProcessor(0.75), lambda L: L.TypicalLogitsWarper(0.75), [True, True, False, False]),
        # "probs < epsilon": a token exactly at epsilon stays
        (EpsilonProcessor(0.125), lambda L: L.EpsilonLogitsWarper(0.125), [True, True, True, True]),
        (EpsilonProcessor(0.25), lambda L: L.EpsilonLogitsWarper(0.25), [True, True, False, False]),
        # H = 1.75 ln 2, so the cut is min(0.5, sqrt(0.5) * 2**-1.75) = 0.2102: the 1/8 tokens go
        (EtaProcessor(0.5), lambda L: L.EtaLogitsWarper(0.5), [True, True, False, False]),
        # min(0.2, sqrt(0.2) * 2**-1.75) = 0.133 cuts the 1/8 tokens as well; 0.1 keeps them (cut 0.094)
        (EtaProcessor(0.2), lambda L: L.EtaLogitsWarper(0.2), [True, True, False, False]),
        (EtaProcessor(0.1), lambda L: L.EtaLogitsWarper(0.1), [True, True, True, True]),
    ],
)
def test_exact_threshold_comparisons(ours, make_theirs, kept):
    """Probabilities 1/2, 1/4, 1/8, 1/8 are exact in float32, so each strict/non-strict test shows."""
    _, L = _hf()
    scores = np.log(np.array([[0.5, 0.25, 0.125, 0.125]])).astype(np.float32)
    out = run_ours(ours, scores)
    np.testing.assert_array_equal(np.isfinite(out)[0], kept)
    np.testing.assert_array_equal(np.isfinite(run_hf(make_theirs(L), scores))[0], kept)


def test_large_vocab_chain_parity():
    """The full chain on a realistic [16, 49152] batch matches transformers' LogitsProcessorList."""
    torch, L = _hf()
    rng = np.random.default_rng(7)
    scores = (rng.standard_normal((16, 49152)) * 3).astype(np.float32)
    ours = run_ours(build_processors(temperature=0.8, top_k=200, top_p=0.9, min_p=0.02, typical_p=0.95,
                                     epsilon_cutoff=3e-4, eta_cutoff=1e-3), scores)
    theirs_list = L.LogitsProcessorList(
        [
            L.TemperatureLogitsWarper(0.8),
            L.TopKLogitsWarper(200),
            L.TopPLogitsWarper(0.9),
            L.MinPLogitsWarper(0.02),
            L.TypicalLogitsWarper(0.95),
            L.EpsilonLogitsWarper(3e-4),
            L.EtaLogitsWarper(1e-3),
        ]
    )
    theirs = run_hf(theirs_list, scores)
    assert_same_filter(ours, theirs, scores, ties_may_differ=False)


@pytest.mark.parametrize("make", [lambda: (EpsilonProcessor(3e-5), "EpsilonLogitsWarper", 3e-5),
                                  lambda: (EtaProcessor(3e-4), "EtaLogitsWarper", 3e-4)], ids=["epsilon", "eta"])
def test_large_vocab_epsilon_eta_parity(make):
    """On a 49152 vocabulary the cut falls among thousands of tokens, and torch's float32 softmax and
    entropy (its own summation order) differ from the float64-then-rounded ones here by a few ulps.
    So: identical masks except tokens whose probability is within 1e-5 (relative) of the cut, and
    at most 2 of those in 16 rows. (Eta's cut min(eta, sqrt(eta)·exp(-H)) is ~1e-5 here, where the
    tokens are densest; with 20 seeds x 6 cut-offs, 4 of 1440 masks differed by one such token.)"""
    torch, L = _hf()
    ours_proc, name, value = make()
    rng = np.random.default_rng(11)
    scores = (rng.standard_normal((16, 49152)) * 3).astype(np.float32)
    ours = run_ours(ours_proc, scores)
    theirs = run_hf(getattr(L, name)(value), scores)
    differ = np.isneginf(ours) != np.isneginf(theirs)
    kept = ~np.isneginf(ours)
    assert (np.isneginf(ours) & np.isfinite(scores)).sum() > 16 * 1000  # the cut is not vacuous
    np.testing.assert_array_equal(ours[kept & ~differ], scores[kept & ~differ])
    if differ.any():
        probs = softmax(scores).astype(np.float64)
        cut = (ours_proc.threshold(scores) if isinstance(ours_proc, EtaProcessor)
               else np.full((16, 1), np.float32(value))).astype(np.float64)
        rows, cols = np.nonzero(differ)
        np.testing.assert_allclose(probs[rows, cols], cut[rows, 0], rtol=1e-5)
    assert differ.sum() <= 2


# ---------------------------------------------------------------------------------------------
# composition and build_processors
# ---------------------------------------------------------------------------------------------

BUILD_CONFIGS = [
    dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.8),
    dict(temperature=0.7, top_k=50, top_p=0.95, min_p=0.0, typical_p=0.9, epsilon_cutoff=3e-4, eta_cutoff=2e-3),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.01),
    dict(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, eta_cutoff=0.05),
    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.05, typical_p=1.0, epsilon_cutoff=1e-3, eta_cutoff=4e-3),
    dict(temperature=1.3, top_k=50, top_p=0.5, min_p=0.0, typical_p=1.0),
    dict(temperature=0.5, top_k=0, top_p=0.99, min_p=0.2, typical_p=0.9),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05, typical_p=0.2),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0),
]


def _hf_processor_list(cfg):
    """The warpers transformers' own generate() would build for cfg (via _get_logits_processor)."""
    _hf()
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    class _NoModel(GenerationMixin):
        pass

    gen_cfg = GenerationConfig(
        do_sample=True,
        temperature=cfg["temperature"],
        top_k=cfg["top_k"],
        top_p=cfg["top_p"],
        min_p=cfg["min_p"] or None,
        typical_p=cfg["typical_p"],
        epsilon_cutoff=cfg.get("epsilon_cutoff", 0.0),
        eta_cutoff=cfg.get("eta_cutoff", 0.0),
    )
    try:
        return _NoModel()._get_logits_processor(gen_cfg, device="cpu")
    except (AttributeError, TypeError) as exc:  # private API moved: nothing to compare against
        pytest.skip(f"transformers' _get_logits_processor is not callable this way: {exc}")


@pytest.mark.parametrize("cfg", BUILD_CONFIGS, ids=[str(i) for i in range(len(BUILD_CONFIGS))])
def test_build_processors_matches_generate(cfg):
    theirs_list = _hf_processor_list(cfg)
    ours_list = build_processors(**cfg)
    assert isinstance(ours_list, ProcessorList)
    hf_names = [type(p).__name__.replace("LogitsWarper", "") for p in theirs_list]
    our_names = [type(p).__name__.replace("Processor", "") for p in ours_list]
    assert our_names == hf_names  # same warpers, same order
    for seed in SEEDS:
        for vocab in VOCABS:
            scores = make_logits(seed, vocab)
            ours = run_ours(ours_list, scores)
            theirs = run_hf(theirs_list, scores)
            assert_same_filter(ours, theirs, scores, ties_may_differ=True)


def test_build_processors_order_and_identity_skips():
    names = [type(p).__name__ for p in build_processors(0.7, 5, 0.9, 0.1, 0.8)]
    assert names == ["TemperatureProcessor", "TopKProcessor", "TopPProcessor", "MinPProcessor", "TypicalProcessor"]
    # transformers' order, then its epsilon and eta; llama.cpp's top-n-sigma ahead of the other cuts
    names = [type(p).__name__ for p in build_processors(0.7, 5, 0.9, 0.1, 0.8, 3e-4, 1e-3, 1.5)]
    assert names == ["TemperatureProcessor", "TopNSigmaProcessor", "TopKProcessor", "TopPProcessor", "MinPProcessor",
                     "TypicalProcessor", "EpsilonProcessor", "EtaProcessor"]
    assert [type(p).__name__ for p in build_processors(eta_cutoff=1e-3)] == ["EtaProcessor"]
    assert len(build_processors()) == 0
    assert [type(p).__name__ for p in build_processors(top_p=0.5)] == ["TopPProcessor"]
    assert [type(p).__name__ for p in build_processors(min_p=0.3, temperature=2.0)] == [
        "TemperatureProcessor",
        "MinPProcessor",
    ]


def test_processor_list_applies_in_order_and_copies():
    scores = np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    ids = np.zeros((1, 1), dtype=np.int64)
    # temperature first makes the distribution flatter, so top-p keeps more tokens than the reverse
    flat_first = ProcessorList([TemperatureProcessor(10.0), TopPProcessor(0.5)])(ids, scores)
    filter_first = ProcessorList([TopPProcessor(0.5), TemperatureProcessor(10.0)])(ids, scores)
    assert np.isfinite(flat_first).sum() == 2
    assert np.isfinite(filter_first).sum() == 1
    empty = ProcessorList().apply(scores, ids)
    assert empty is scores  # nothing to do: the scores as they are, no copy (callers never write to them)
    one = ProcessorList([TopKProcessor(2)]).apply(scores)
    assert one is not scores and np.isfinite(one).sum() == 2


# ---------------------------------------------------------------------------------------------
# documented behaviour that transformers leaves to torch.sort / rejects
# ---------------------------------------------------------------------------------------------


def test_ties_keep_lowest_token_ids():
    ids = np.zeros((1, 1), dtype=np.int64)
    flat = np.zeros((1, 4), dtype=np.float32)
    # cumulative mass 0.25, 0.5, 0.75, 1.0: two tokens are <= 1 - 0.5 and go; the lowest ids stay
    np.testing.assert_array_equal(np.isfinite(TopPProcessor(0.5)(ids, flat)), [[True, True, False, False]])
    # min-p 1.0 keeps only the maximum; min_tokens_to_keep rescues the next ids among equals
    x = np.array([[1.0, 5.0, 3.0, 3.0, 3.0, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        np.isfinite(MinPProcessor(1.0, min_tokens_to_keep=3)(ids, x)), [[False, True, True, False, False, True]]
    )
    # typical: only token 0 is needed for the mass; keep-3 adds the lowest ids of the tied rest
    peaked = np.array([[5.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.isfinite(TypicalProcessor(0.1)(ids, peaked)), [[True, False, False, False, False]])
    np.testing.assert_array_equal(
        np.isfinite(TypicalProcessor(0.1, min_tokens_to_keep=3)(ids, peaked)), [[True, True, True, False, False]]
    )
    # top-k keeps every token tied with the k-th value, like transformers
    assert np.isfinite(TopKProcessor(1)(ids, flat)).sum() == 4


def test_typical_uniform_and_mass_one():
    ids = np.zeros((1, 1), dtype=np.int64)
    uniform = np.zeros((1, 6), dtype=np.float32)
    # every token is exactly typical, so they form one block and are all kept
    assert np.isfinite(TypicalProcessor(0.1)(ids, uniform)).all()
    x = np.array([[3.0, 0.0, -1.0, -np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(TypicalProcessor(1.0)(ids, x), x)
    # the most likely token is not protected by typical decoding
    peaked = np.array([[10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert np.isfinite(TypicalProcessor(0.2)(ids, peaked)).sum() >= 1


def test_disabled_and_float64_inputs():
    ids = np.zeros((2, 1), dtype=np.int64)
    x = np.array([[0.5, -1.0, 2.0], [-np.inf, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(TopKProcessor(0)(ids, x), x)
    np.testing.assert_array_equal(MinPProcessor(0.0)(ids, x), x)
    out64 = TopKProcessor(1)(ids, x.astype(np.float64))
    assert out64.dtype == np.float64
    np.testing.assert_array_equal(np.isfinite(out64), [[False, False, True], [False, True, True]])


@pytest.mark.parametrize(
    "make",
    [
        lambda: TemperatureProcessor(0.0),
        lambda: TemperatureProcessor(-1.0),
        lambda: TemperatureProcessor(float("nan")),
        lambda: TemperatureProcessor(float("inf")),
        lambda: TopKProcessor(-1),
        lambda: TopKProcessor(2.5),
        lambda: TopPProcessor(0.0),
        lambda: TopPProcessor(1.5),
        lambda: MinPProcessor(-0.1),
        lambda: MinPProcessor(1.1),
        lambda: TypicalProcessor(0.0),
        lambda: TypicalProcessor(1.01),
        lambda: TopPProcessor(0.9, min_tokens_to_keep=0),
        lambda: MinPProcessor(0.1, min_tokens_to_keep=1.5),
        lambda: build_processors(temperature=0.0),
        lambda: build_processors(top_k=-3),
        lambda: EpsilonProcessor(1.0),
        lambda: EpsilonProcessor(-1e-4),
        lambda: EpsilonProcessor(float("nan")),
        lambda: EtaProcessor(1.0),
        lambda: EtaProcessor(-0.1),
        lambda: EtaProcessor(1e-3, min_tokens_to_keep=0),
        lambda: TopNSigmaProcessor(float("inf")),
        lambda: TopNSigmaProcessor(float("nan")),
        lambda: build_processors(epsilon_cutoff=1.0),
        lambda: build_processors(eta_cutoff=-0.001),
        lambda: build_processors(top_n_sigma=-1.0),
    ],
)
def test_invalid_settings_raise(make):
    with pytest.raises(ValueError):
        make()


def test_module_does_not_import_torch():
    """The runtime must not pull in torch/transformers through the processors or the settings."""
    code = (
        "import sys\n"
        "import epic_ort.sampling.processors, epic_ort.sampling.truncation, epic_ort.sampling.mirostat\n"
        "import epic_ort.settings\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert importlib.util.find_spec("numpy") is not None


# ---------------------------------------------------------------------------------------------
# properties on adversarial logits
# ---------------------------------------------------------------------------------------------

_FINITE = st.one_of(
    st.sampled_from([1e30, -1e30, 0.0, 1.0, -1.0]),
    st.floats(-100, 100, width=32),
    st.floats(float(np.float32(-1e30)), float(np.float32(1e30)), width=32),
)
_ENTRY = st.one_of(st.just(-np.inf), _FINITE)


@st.composite
def adversarial_logits(draw) -> np.ndarray:
    batch = draw(st.integers(1, 4))
    vocab = draw(st.one_of(st.integers(1, 5), st.integers(6, 40)))
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["mixed", "one_finite", "all_equal", "huge", "all_neg_inf"]))
        if kind == "mixed":
            row = draw(st.lists(_ENTRY, min_size=vocab, max_size=vocab))
        elif kind == "one_finite":
            row = [-np.inf] * vocab
            row[draw(st.integers(0, vocab - 1))] = draw(_FINITE)
        elif kind == "all_equal":
            row = [draw(_FINITE)] * vocab
        elif kind == "huge":
            row = draw(st.lists(st.sampled_from([1e30, -1e30, -np.inf]), min_size=vocab, max_size=vocab))
        else:
            row = [-np.inf] * vocab
        rows.append(row)
    return np.array(rows, dtype=np.float32)


PROPERTY_PROCESSORS = {
    "temperature=0.5": TemperatureProcessor(0.5),
    "temperature=1.3": TemperatureProcessor(1.3),
    "top_k=1": TopKProcessor(1),
    "top_k=3-keep3": TopKProcessor(3, min_tokens_to_keep=3),
    "top_p=0.1": TopPProcessor(0.1),
    "top_p=0.9-keep3": TopPProcessor(0.9, min_tokens_to_keep=3),
    "top_p=1.0": TopPProcessor(1.0),
    "min_p=0.2": MinPProcessor(0.2),
    "min_p=1.0-keep3": MinPProcessor(1.0, min_tokens_to_keep=3),
    "typical=0.2": TypicalProcessor(0.2),
    "typical=0.9-keep3": TypicalProcessor(0.9, min_tokens_to_keep=3),
    "chain": build_processors(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, typical_p=0.9),
    "chain-hot": build_processors(temperature=1.3, top_p=0.5, min_p=0.2),
    "epsilon=0.05": EpsilonProcessor(0.05),
    "epsilon=0.2-keep3": EpsilonProcessor(0.2, min_tokens_to_keep=3),
    "eta=0.01": EtaProcessor(0.01),
    "eta=0.5-keep3": EtaProcessor(0.5, min_tokens_to_keep=3),
    "top_n_sigma=0.5": TopNSigmaProcessor(0.5),
    "top_n_sigma=2": TopNSigmaProcessor(2.0),
    "chain-new": build_processors(temperature=0.7, top_n_sigma=1.0, top_k=5, epsilon_cutoff=0.01, eta_cutoff=0.01),
}


@pytest.mark.parametrize("name", list(PROPERTY_PROCESSORS))
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scores=adversarial_logits())
def test_processors_keep_a_valid_distribution(name, scores):
    processor = PROPERTY_PROCESSORS[name]
    out = run_ours(processor, scores)
    assert out.shape == scores.shape
    assert out.dtype == np.float32
    assert not np.isnan(out).any()
    had_finite = np.isfinite(scores).any(axis=-1)
    assert np.isfinite(out).any(axis=-1)[had_finite].all()
    # rows that were entirely banned come back unchanged
    np.testing.assert_array_equal(out[~had_finite], scores[~had_finite])
    probs = softmax(out)
    assert not np.isnan(probs).any()
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs[had_finite].sum(axis=-1), 1.0, atol=1e-5)
    if not name.startswith(("temperature", "chain")):
        # filters only ban: survivors keep their logit, banned entries are -inf
        kept = np.isfinite(out)
        np.testing.assert_array_equal(out[kept], scores[kept])
        assert np.isneginf(out[~kept]).all()
    if name.startswith(("top_k", "top_p", "min_p", "epsilon", "eta", "top_n_sigma")):
        # these never ban the most likely token (the lowest id among tied maxima)
        rows = np.flatnonzero(had_finite)
        best = np.argmax(scores[rows], axis=-1)
        assert np.isfinite(out[rows, best]).all()
