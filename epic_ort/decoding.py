"""The decoding loop: prompts in, samples out, for plain sampling and EPIC alike.

Rows (prompt x sample) are decoded together in batches; identical prompts are prefilled once
and forked. Each step the active rows' logits pass through the processors and a token chooser
(plain: one draw per row; EPIC: lazy Gumbel-max over lookahead entropies). EPIC's chooser already
ran the model on its chosen tokens, so it hands back the next logits and cache and the loop
skips its own step. Finished rows leave the cache at once.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from .errors import InvalidRequestError
from .runtime.model import CausalLM, KVBuffers, KVCache
from .sampling.processors import ProcessorList, build_processors
from .sampling.sample import greedy, sample_categorical, sample_rng


@dataclass
class GenerationConfig:
    """Everything that decides which tokens come out (apart from the model and prompts)."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    alpha: float = 0.0
    horizon: int = 4
    rollouts: int = 2
    truncate: str = "error"  # or "left": keep the end of a prompt longer than the context

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise InvalidRequestError("temperature must be > 0 (use greedy for argmax decoding)")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError("min_p must be in [0, 1]")
        if not 0 < self.typical_p <= 1:
            raise InvalidRequestError("typical_p must be in (0, 1]")
        if self.horizon < 1 or self.rollouts < 1:
            raise InvalidRequestError("horizon and rollouts must be >= 1")
        if not np.isfinite(self.alpha):
            raise InvalidRequestError("alpha must be a finite number")
        if self.truncate not in ("error", "left"):
            raise InvalidRequestError("truncate must be 'error' or 'left'")

    def processors(self) -> ProcessorList:
        return build_processors(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            typical_p=self.typical_p,
        )


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # eos | stop | length
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "sample_index": self.sample_index,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats,
        }


@dataclass
class Row:
    """Per-sample decoding state."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """A chooser's answer for the active rows: the tokens and, when it already ran them, the
    logits and cache that follow them (EPIC's lookahead reuse)."""

    tokens: np.ndarray
    next_logits: np.ndarray | None = None
    next_cache: KVCache | None = None
    row_stats: list[dict[str, int]] | None = None


class TokenChooser(Protocol):
    """Picks each active row's next token. A chooser that runs the model on scratch tokens after
    the cache (EPIC's token trees) says how many positions per row it wants kept free in an
    optional `cache_scratch` attribute (wrappers must pass it on); the decoding loop then sizes
    the cache for prompt + new tokens + that, so the cache does not have to grow mid-generation."""

    def __call__(
        self, model: CausalLM, rows: Sequence[Row], logits: np.ndarray, scores: np.ndarray, cache: KVCache
    ) -> StepResult: ...


def plain_chooser(greedy_decoding: bool) -> TokenChooser:
    def choose(model, rows, logits, scores, cache) -> StepResult:
        if greedy_decoding:
            return StepResult(greedy(scores))
        return StepResult(sample_categorical(scores, [r.rng for r in rows]))

    return choose


OnToken = Callable[[Row, str], None]


def encode_prompts(model: CausalLM, prompts: Sequence[str], chat: bool, truncate: str) -> list[list[int]]:
    """Tokenize, refusing empty prompts and prompts that leave no room in the context."""
    out = []
    limit = model.max_positions - 1
    for i, prompt in enumerate(prompts):
        if not prompt or not prompt.strip():
            raise InvalidRequestError(f"prompt {i} is empty")
        text = model.apply_chat_template(prompt) if chat else prompt
        ids = model.encode(text)
        if not ids:
            raise InvalidRequestError(f"prompt {i} encodes to no tokens")
        if len(ids) > limit:
            if truncate != "left":
                raise InvalidRequestError(
                    f"prompt {i} has {len(ids)} tokens, more than the model's context of {model.max_positions} "
                    "allows; shorten it or pass --truncate left"
                )
            bos = model.manifest.bos_token_id
            head = ids[:1] if bos is not None and ids[0] == bos else []
            ids = head + ids[len(ids) - (limit - len(head)):]
        out.append(ids)
    return out


def resolve_seed(seed: int | None) -> int:
    return int(seed) if seed is not None else secrets.randbits(63)


def generate(
    model: CausalLM,
    prompts: Sequence[str] | None = None,
    config: GenerationConfig | None = None,
    *,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    num_samples: int = 1,
    batch_size: int = 8,
    chat: bool = False,
    chooser: TokenChooser | None = None,
    on_token: OnToken | None = None,
) -> Iterator[Sample]:
    """Decode every prompt `num_samples` times; yield each sample as soon as it finishes.

    With the same `config.seed`, a sample's tokens depend only on its prompt and its
    (prompt_index, sample_index), not on the batch size.
    """
    config = config or GenerationConfig()
    config.validate()
    if num_samples < 1 or batch_size < 1:
        raise InvalidRequestError("num_samples and batch_size must be >= 1")
    if prompt_ids is None:
        if prompts is None:
            raise InvalidRequestError("give prompts or prompt_ids")
        prompt_ids = encode_prompts(model, prompts, chat, config.truncate)
    seed = resolve_seed(config.seed)
    config = replace(config, seed=seed)
    if chooser is None:
        chooser = make_chooser(config)
    processors = config.processors() if not config.greedy else ProcessorList()
    jobs = [(p, s) for p in range(len(prompt_ids)) for s in range(num_samples)]
    for start in range(0, len(jobs), batch_size):
        rows = [
            Row(p, s, list(prompt_ids[p]), sample_rng(seed, p, s)) for p, s in jobs[start : start + batch_size]
        ]
        yield from _decode_batch(model, rows, config, processors, chooser, on_token)


def make_chooser(config: GenerationConfig) -> TokenChooser:
    if config.greedy or config.alpha == 0:
        return plain_chooser(config.greedy)
    from .epic.sampler import EpicChooser

    return EpicChooser(alpha=config.alpha, horizon=config.horizon, rollouts=config.rollouts, processors=config.processors())


def _prefill_rows(model: CausalLM, rows: Sequence[Row], room: int) -> tuple[np.ndarray, KVCache]:
    """Prefill each distinct prompt once, then fork its cache to every row that shares it.
    `room`: tokens the cache gets space for after the longest prompt."""
    unique: dict[tuple[int, ...], int] = {}
    owner = [unique.setdefault(tuple(r.prompt_ids), len(unique)) for r in rows]
    logits, cache = model.prefill([list(k) for k in unique], room=room)
    if len(unique) == len(rows) and owner == list(range(len(rows))):
        return logits, cache
    return logits[owner], cache.select(owner)


def _decode_batch(
    model: CausalLM,
    rows: list[Row],
    config: GenerationConfig,
    processors: ProcessorList,
    chooser: TokenChooser,
    on_token: OnToken | None,
) -> Iterator[Sample]:
    t0 = time.perf_counter()
    prompt = max(len(r.prompt_ids) for r in rows)
    longest = min(prompt + config.max_new_tokens, model.max_positions)
    # room for every token to come, plus the scratch a chooser runs through the cache (EPIC's trees)
    logits, cache = _prefill_rows(model, rows, longest - prompt + int(getattr(chooser, "cache_scratch", 0)))
    for r in rows:
        r.stats = {"prompt_tokens": len(r.prompt_ids)}
    active = list(range(len(rows)))
    eos = set(model.eos_token_ids)
    holdback = max((len(s) for s in config.stop), default=0)
    stream = _StreamState()
    need_text = bool(config.stop) or on_token is not None
    buffers: KVBuffers | None = None  # plain decoding writes each step's cache into these (graphs that
    # cannot write in place)
    while active:
        act_rows = [rows[i] for i in active]
        if len(processors):
            history = np.array([r.generated for r in act_rows], dtype=np.int64).reshape(len(act_rows), -1)
            scores = processors(history, logits)
        else:
            scores = logits
        result = chooser(model, act_rows, logits, scores, cache)
        tokens = result.tokens
        keep = []
        for j, (r, tok) in enumerate(zip(act_rows, tokens.tolist())):
            r.generated.append(int(tok))
            if result.row_stats is not None:
                for k, v in result.row_stats[j].items():
                    r.stats[k] = r.stats.get(k, 0) + v
            reason = None
            if tok in eos:
                reason = "eos"
            else:
                cut = None
                if need_text:
                    text = model.decode(r.generated)
                    cut = _find_stop(text, config.stop)
                    r.text = text if cut is None else text[:cut]
                if cut is not None:
                    reason = "stop"
                elif len(r.generated) >= config.max_new_tokens or len(r.prompt_ids) + len(r.generated) >= model.max_positions:
                    reason = "length"
                    if not need_text:
                        r.text = model.decode(r.generated)
            if on_token is not None:
                stream.emit(r, reason, holdback, on_token)
            if reason is None:
                keep.append(j)
            else:
                r.finish_reason = reason
                if reason == "eos":
                    r.text = model.decode(r.generated)
                yield _finish(r, t0)
        if not keep:
            break
        if result.next_logits is not None and result.next_cache is not None:
            logits, cache = result.next_logits, result.next_cache
            if len(keep) < len(act_rows):
                logits, cache = logits[keep], cache.compacted(keep)
        else:
            if len(keep) < len(act_rows):
                cache = cache.compacted(keep)
            if buffers is None and model.device == "cpu" and not model.kv_in_place:
                buffers = KVBuffers(model, len(rows), longest)
            logits, cache = model.step(tokens[keep], cache, present_buffers=buffers.next() if buffers else None)
        active = [active[j] for j in keep]


def _finish(r: Row, t0: float) -> Sample:
    seconds = time.perf_counter() - t0
    stats = dict(r.stats)
    stats.update({"tokens": len(r.generated), "seconds": round(seconds, 4)})
    return Sample(r.prompt_index, r.sample_index, r.text, list(r.generated), r.finish_reason or "length", stats)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s]
    cuts = [c for c in cuts if c >= 0]
    return min(cuts) if cuts else None


class _StreamState:
    """Emit only text that is final: hold back what may still turn into a stop string and
    a trailing partial UTF-8 character."""

    def __init__(self) -> None:
        self.sent: dict[int, int] = {}

    def emit(self, r: Row, reason: str | None, holdback: int, on_token: OnToken) -> None:
        key = id(r)
        sent = self.sent.get(key, 0)
        text = r.text
        if reason is None:
            safe = len(text) - max(holdback - 1, 0)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            safe = len(text)
        if safe > sent:
            on_token(r, text[sent:safe])
            self.sent[key] = safe
