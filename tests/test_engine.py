"""The continuous-batching engine on the tiny Llama (no HTTP): offline equality, independence from the
batch, joining mid-generation, cancelling, the bounded queue, shared calls, the cache layout."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from epic_ort import generate
from epic_ort.engine import (
    DoneEvent,
    Engine,
    EngineRequest,
    QueueFullError,
    SampleEvent,
    TokenEvent,
)
from epic_ort.engine.kvbatch import BatchCache
from epic_ort.engine.penalties import OpenAIPenalties
from epic_ort.errors import InvalidRequestError
from epic_ort.settings import GenerationConfig

EOS = 2
NO_EOS = {EOS: -100.0}  # keeps a request running to its budget

MIXED = [
    ("hello there", GenerationConfig(max_new_tokens=30, seed=1)),
    ("the cat", GenerationConfig(max_new_tokens=12, seed=2, temperature=0.7, top_p=0.9)),
    ("why is it", GenerationConfig(max_new_tokens=20, seed=3, top_k=5, stop=("e",))),
    ("a b c", GenerationConfig(max_new_tokens=16, seed=4, greedy=True)),
    ("once upon", GenerationConfig(max_new_tokens=14, seed=5, alpha=0.5, horizon=3, rollouts=2)),
    ("so it goes", GenerationConfig(max_new_tokens=14, seed=6, alpha=-0.4, top_p=0.8, horizon=3, rollouts=2)),
    ("in the end", GenerationConfig(max_new_tokens=10, seed=7, alpha=1.0, horizon=1, rollouts=1)),
]
if hasattr(GenerationConfig(), "mirostat_tau"):  # a chooser of its own, in the plain group
    MIXED.append(("far away", GenerationConfig(max_new_tokens=15, seed=8, mirostat_tau=3.0)))


def offline(model, prompt, config, n=1):
    samples = sorted(generate(model, [prompt], config, num_samples=n), key=lambda s: s.sample_index)
    return [(s.text, s.token_ids, s.finish_reason) for s in samples]


def summary(samples):
    return [(s.text, s.token_ids, s.finish_reason) for s in samples]


class Collector:
    """A sink that keeps every event and says when the request is over."""

    def __init__(self, on_event=None):
        self.events, self.done, self.on_event = [], threading.Event(), on_event

    def __call__(self, events):
        for e in events:
            self.events.append(e)
            if self.on_event is not None:
                self.on_event(e)
            if isinstance(e, DoneEvent):
                self.done.set()

    def samples(self):
        assert self.done.wait(60), "the request did not finish"
        return summary(sorted((e.sample for e in self.events if isinstance(e, SampleEvent)), key=lambda s: s.sample_index))


def submit_all(engine, model, items, n=2):
    sinks = []
    for prompt, config in items:
        sinks.append(Collector())
        engine.submit(EngineRequest(model.encode(prompt), config, n=n), sinks[-1])
    return sinks


def test_mixed_requests_equal_offline(tiny_llama):
    engine = Engine(tiny_llama, max_running=32)
    sinks = submit_all(engine, tiny_llama, MIXED)  # queued before the engine starts: they all join at once
    with engine.start():
        got = [s.samples() for s in sinks]
    for (prompt, config), samples in zip(MIXED, got):
        assert samples == offline(tiny_llama, prompt, config, n=2), (prompt, config)
    assert engine.stats().running_rows == 0


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=25, seed=11, top_p=0.9),
                                    GenerationConfig(max_new_tokens=12, seed=12, alpha=0.6, horizon=3, rollouts=2)],
                         ids=["plain", "epic"])
def test_same_seed_alone_or_among_15_others(tiny_llama, config):
    target = ("it was a dark night", config)
    others = [(f"{p} {i}", replace(c, seed=100 + i)) for i, (p, c) in enumerate((MIXED * 3)[:15])]
    with Engine(tiny_llama, max_running=48) as engine:
        alone = engine.generate(EngineRequest(tiny_llama.encode(target[0]), config, n=2))
    engine = Engine(tiny_llama, max_running=48)
    sinks = submit_all(engine, tiny_llama, others[:7] + [target] + others[7:])
    with engine.start():
        among = sinks[7].samples()
        [s.samples() for s in sinks]
    assert among == summary(alone) == offline(tiny_llama, *target, n=2)


def test_join_mid_generation_with_a_longer_prompt(tiny_llama):
    long_run = EngineRequest(tiny_llama.encode("a"), GenerationConfig(max_new_tokens=60, seed=3), logit_bias=NO_EOS)
    joiner = EngineRequest(tiny_llama.encode("the quick brown fox jumps over the lazy dog again"),
                           GenerationConfig(max_new_tokens=20, seed=4, alpha=0.3, horizon=2), n=2)
    with Engine(tiny_llama) as engine:
        alone_long, alone_join = engine.generate(long_run), engine.generate(joiner)
        order: list[str] = []
        join_sink = Collector(lambda e: order.append("join") if isinstance(e, TokenEvent) else None)

        def on_long(e):
            order.append("done" if isinstance(e, DoneEvent) else "long")
            if order.count("long") == 5:  # from the engine thread: it joins at the next step boundary
                engine.submit(joiner, join_sink)

        long_sink = Collector(on_long)
        engine.submit(long_run, long_sink)
        assert long_sink.samples() == summary(alone_long)
        assert join_sink.samples() == summary(alone_join)
    assert order.index("join") < order.index("done")  # it decoded beside the running request
    assert order[:5] == ["long"] * 5


def test_cancel_leaves_at_once_and_room_is_reused(tiny_llama):
    request = EngineRequest(tiny_llama.encode("hello"), GenerationConfig(max_new_tokens=100, seed=1), n=3,
                            logit_bias=NO_EOS)
    with Engine(tiny_llama) as engine:
        holder = {}
        sink = Collector(lambda e: holder["job"].cancel() if isinstance(e, TokenEvent) and len(sink.events) == 6 else None)
        holder["job"] = engine.submit(request, sink)
        assert sink.done.wait(60)
        done = sink.events[-1]
        assert isinstance(done, DoneEvent) and done.cancelled
        assert done.completion_tokens < 300
        assert not any(isinstance(e, SampleEvent) for e in sink.events)
        assert engine.stats().running_rows == 0 and engine.stats().running_requests == 0
        arena = engine.scheduler.groups["plain"].kv.arena
        assert len(engine.generate(replace(request, config=GenerationConfig(max_new_tokens=90, seed=2)))) == 3
        assert engine.scheduler.groups["plain"].kv.arena is arena  # the same buffers, reused


def test_leaving_an_async_stream_cancels_it(tiny_llama):
    request = EngineRequest(tiny_llama.encode("hello"), GenerationConfig(max_new_tokens=100, seed=1), logit_bias=NO_EOS)

    async def read_three(engine):
        seen = 0
        async for event in engine.stream(request):
            seen += isinstance(event, TokenEvent)
            if seen == 3:
                break
        return seen

    with Engine(tiny_llama) as engine:
        assert asyncio.run(read_three(engine)) == 3
        deadline = time.monotonic() + 30
        while engine.stats().running_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats().running_rows == 0


def test_queue_is_bounded(tiny_llama):
    engine = Engine(tiny_llama, max_running=2, max_queue=2)
    request = EngineRequest(tiny_llama.encode("hi"), GenerationConfig(max_new_tokens=4, seed=0), n=2)
    sinks = [Collector(), Collector()]
    for s in sinks:
        engine.submit(request, s)
    with pytest.raises(QueueFullError, match="full"):
        engine.submit(request, Collector())
    with pytest.raises(InvalidRequestError, match="n = 3"):
        engine.submit(replace(request, n=3), Collector())
    with engine.start():
        assert [len(s.samples()) for s in sinks] == [2, 2]


@pytest.mark.parametrize("bad, match", [
    (dict(config=GenerationConfig(alpha="auto")), "resolved"),
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=[5] * 200), "context"),
    (dict(logprobs=99), "logprobs"),
    (dict(logit_bias={10_000: 1.0}), "vocabulary"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(config=GenerationConfig(top_p=2.0)), "top_p"),
])
def test_bad_requests_are_refused_at_once(tiny_llama, bad, match):
    engine = Engine(tiny_llama)
    request = replace(EngineRequest(tiny_llama.encode("hi")), **bad)
    with pytest.raises(InvalidRequestError, match=match):
        engine.submit(request, Collector())
    assert engine.stats().queued == 0


def test_plain_rows_share_one_step_call_whatever_their_processors(tiny_llama):
    configs = [GenerationConfig(max_new_tokens=10, seed=1), GenerationConfig(max_new_tokens=10, seed=2, top_k=4),
               GenerationConfig(max_new_tokens=10, seed=3, temperature=0.5, min_p=0.1),
               GenerationConfig(max_new_tokens=10, seed=4, greedy=True)]
    engine = Engine(tiny_llama)
    sinks = [Collector() for _ in configs]
    for c, s in zip(configs, sinks):
        engine.submit(EngineRequest(tiny_llama.encode("abc"), c, logit_bias=NO_EOS), s)
    before = tiny_llama.calls.calls
    with engine.start():
        [s.samples() for s in sinks]
    assert tiny_llama.calls.calls - before == 1 + 9  # one prefill, then one step a token for all four


def test_epic_rows_with_their_own_alpha_share_one_group(tiny_llama):
    a = ("one two", GenerationConfig(max_new_tokens=10, seed=1, alpha=0.8, horizon=2, rollouts=2))
    b = ("three", GenerationConfig(max_new_tokens=10, seed=2, alpha=-0.5, top_k=6, horizon=2, rollouts=2))
    engine = Engine(tiny_llama)
    sinks = submit_all(engine, tiny_llama, [a, b], n=1)
    groups = []
    sinks[0].on_event = lambda e: groups.append(len(engine.scheduler.groups))
    with engine.start():
        got = [s.samples() for s in sinks]
    assert got == [offline(tiny_llama, *a), offline(tiny_llama, *b)]
    assert groups and max(groups) == 1  # one EPIC group (one chooser call per step) for both


def test_stream_holds_back_a_stop_string(tiny_llama):
    config = GenerationConfig(max_new_tokens=40, seed=5)
    text = offline(tiny_llama, "tell me", config)[0][0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    config = replace(config, stop=(stop,))
    with Engine(tiny_llama) as engine:
        events = list(engine.stream_sync(EngineRequest(tiny_llama.encode("tell me"), config)))
    sample = next(e.sample for e in events if isinstance(e, SampleEvent))
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert stop not in streamed and streamed == sample.text
    assert (sample.text, sample.token_ids, sample.finish_reason) == offline(tiny_llama, "tell me", config)[0]


def test_logprobs_and_logit_bias(tiny_llama):
    a = tiny_llama.encode("a", add_special_tokens=False)[0]
    request = EngineRequest(tiny_llama.encode("xyz"), GenerationConfig(max_new_tokens=6, seed=0), logprobs=3,
                            logit_bias={a: 100.0})
    with Engine(tiny_llama) as engine:
        events = [e for e in engine.stream_sync(request) if isinstance(e, TokenEvent)]
    assert [e.token_id for e in events] == [a] * 6
    for e in events:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert [lp for _, lp in e.top_logprobs] == sorted((lp for _, lp in e.top_logprobs), reverse=True)


def test_openai_penalties_arithmetic():
    p = OpenAIPenalties(presence=0.5, frequency=0.25, bias={3: 2.0}, vocab_size=5)
    out = p.apply(np.zeros((1, 5), dtype=np.float32), np.array([[1, 1, 4]]))
    assert out.tolist() == [[0.0, -1.0, 0.0, 2.0, -0.75]]


def test_batch_cache_drops_common_padding(tiny_llama):
    """A long row leaves: the padding every other row then has goes, and decoding goes on unchanged."""
    model = tiny_llama
    long_ids, short_ids = model.encode("x" * 90), model.encode("hi")
    kv = BatchCache(model, 4)
    _, pre = model.prefill([long_ids, short_ids])
    kv.add(pre, [0, 1], room=20)
    assert kv.cache.length == len(long_ids)
    order = kv.keep([1])
    assert order == [0] or order == [1]
    assert kv.cache.length == len(short_ids)  # 89 columns of padding dropped
    got, _ = model.step([7], kv.cache)
    _, alone = model.prefill([short_ids], room=4)
    want, _ = model.step([7], alone)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_joining_epic_row_does_not_share_a_call_with_anothers_run_ahead(tiny_llama, monkeypatch):
    """Row A decoded alone runs its next step ahead; when B joins, the joint call runs every candidate
    (given=None): with A's run-ahead applied, B's candidates would all stop after depth 0 and B's
    search would then evaluate the whole vocabulary in a second round."""
    from epic_ort.chooser import Row
    from epic_ort.epic import chooser as epic_chooser_module
    from epic_ort.epic.chooser import EpicChooser

    model = tiny_llama
    chooser = EpicChooser(alpha=0.5, horizon=4, rollouts=2)
    a = Row(0, 0, model.encode("hello there"), np.random.default_rng(1))
    logits, cache = model.prefill([a.prompt_ids], room=40 + chooser.scratch_positions)
    for _ in range(30):
        res = chooser.choose(model, [a], logits, logits, cache)
        a.generated.append(int(res.tokens[0]))
        logits, cache = res.next_logits, res.next_cache
        if a.chooser_state.ahead is not None:
            break
    assert a.chooser_state.ahead is not None  # A has a run-ahead waiting for its next step
    b = Row(0, 1, model.encode("why"), np.random.default_rng(2))
    b_logits, b_cache = model.prefill([b.prompt_ids])
    kv = BatchCache(model, 4)
    kv.add(cache, [0], room=40 + chooser.scratch_positions)
    kv.add(b_cache, [0], room=40 + chooser.scratch_positions)
    givens = []
    real = epic_chooser_module.lookahead_entropy

    def spy(*args, **kw):
        givens.append(kw.get("given"))
        return real(*args, **kw)

    monkeypatch.setattr(epic_chooser_module, "lookahead_entropy", spy)
    both = np.concatenate([logits, b_logits])
    res = chooser.choose(model, [a, b], both, both, kv.cache)
    assert givens and all(g is None for g in givens)
    assert res.row_stats[1]["entropy_evals"] >= 1


def test_graphs_that_do_not_write_in_place(tiny_exports):
    """Optimum's graph (a new cache tensor each step, EPIC on forked rows): the same answers."""
    import epic_ort

    model = epic_ort.load(tiny_exports["llama-optimum"]["onnx"], provider="cpu")
    assert not model.kv_in_place
    items = [MIXED[0], MIXED[1], MIXED[4]]
    engine = Engine(model)
    sinks = submit_all(engine, model, items)
    with engine.start():
        got = [s.samples() for s in sinks]
    assert got == [offline(model, p, c, n=2) for p, c in items]
