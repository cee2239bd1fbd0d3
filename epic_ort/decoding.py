"""The decode loop: prompts in, samples out, for plain sampling and EPIC alike.

Rows (prompt x sample) are decoded together in batches; identical prompts are prefilled once and
forked. Each step the running rows' logits pass through the processors and a token chooser
(`chooser.py`: plain, one draw per row; EPIC, lazy Gumbel-max over lookahead entropies). EPIC's
chooser already ran the model on its chosen tokens, so it hands back the next logits and cache and
the loop skips its own step. Finished rows leave the cache at once.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .chooser import PlainChooser, Row, StepResult, TokenChooser
from .errors import InvalidRequestError
from .runtime.cache import KVBuffers, KVCache
from .runtime.model import CausalLM
from .sampling.processors import ProcessorList
from .sampling.sample import sample_rng
from .settings import AUTO, GenerationConfig

__all__ = ["GenerationConfig", "Sample", "encode_prompts", "generate", "make_chooser"]


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


OnToken = Callable[[Row, str], None]


def encode_prompts(model: CausalLM, prompts: Sequence[str], chat: bool, truncate: str) -> list[list[int]]:
    """Tokenize (through the chat template with `chat`), refusing empty prompts and prompts that
    leave no room in the context (or keeping their end, with truncate="left")."""
    out = []
    limit = model.max_positions - 1
    for i, prompt in enumerate(prompts):
        if not prompt or not prompt.strip():
            raise InvalidRequestError(f"prompt {i} is empty")
        ids = model.encode_chat(prompt) if chat else model.encode(prompt)
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


def make_chooser(config: GenerationConfig) -> TokenChooser:
    """The chooser a (resolved) configuration asks for: plain or greedy, mirostat when mirostat_tau > 0,
    or EPIC when alpha != 0 (`GenerationConfig.validate` refuses mirostat with greedy or EPIC)."""
    if config.uses_mirostat:
        from .chooser import MirostatChooser

        return MirostatChooser(config.mirostat_tau, config.mirostat_eta)
    if not config.uses_epic:
        return PlainChooser(config.greedy)
    if not isinstance(config.alpha, float):
        raise InvalidRequestError("alpha 'auto' must be resolved first: epic_ort.resolve_alpha(model, config)")
    from .epic.chooser import EpicChooser

    return EpicChooser(alpha=config.alpha, horizon=config.horizon, rollouts=config.rollouts,
                       processors=config.processors())


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
    prompt_indices: Sequence[int] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[Sample]:
    """Decode every prompt `num_samples` times; yield each sample as soon as it finishes.

    With the same `config.seed`, a sample's tokens depend only on its prompt and its
    (prompt_index, sample_index), not on the batch size. `prompt_indices` gives each prompt's
    prompt_index (default 0, 1, ...): a run resumed on the prompts still missing keeps their random
    streams. alpha "auto" must be resolved first (`epic_ort.resolve_alpha`). `on_step(n)` is called
    after every decoding step with the number of rows that took a token (progress bars).
    """
    config = config or GenerationConfig()
    config.validate()
    if num_samples < 1 or batch_size < 1:
        raise InvalidRequestError("num_samples and batch_size must be >= 1")
    if prompt_ids is None:
        if prompts is None:
            raise InvalidRequestError("give prompts or prompt_ids")
        prompt_ids = encode_prompts(model, prompts, chat, config.truncate)
    if config.alpha == AUTO:
        raise InvalidRequestError("alpha 'auto' must be resolved first: config = epic_ort.resolve_alpha(model, config) "
                                  "(it calibrates once when the model folder has no calibration)")
    config = replace(config, seed=resolve_seed(config.seed))
    chooser = chooser or make_chooser(config)
    processors = config.processors()
    indices = list(range(len(prompt_ids))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompt_ids):
        raise InvalidRequestError(f"{len(prompt_ids)} prompts but {len(indices)} prompt_indices")
    jobs = [(j, s) for j in range(len(prompt_ids)) for s in range(num_samples)]
    for start in range(0, len(jobs), batch_size):
        rows = [Row(indices[j], s, list(prompt_ids[j]), sample_rng(config.seed, indices[j], s))
                for j, s in jobs[start:start + batch_size]]
        yield from _decode_batch(model, rows, config, processors, chooser, on_token, on_step)


def _prefill_rows(model: CausalLM, rows: Sequence[Row], room: int) -> tuple[np.ndarray, KVCache]:
    """Prefill each distinct prompt once, then fork its cache to every row that shares it.
    `room`: tokens the cache gets space for after the longest prompt."""
    unique: dict[tuple[int, ...], int] = {}
    owner = [unique.setdefault(tuple(r.prompt_ids), len(unique)) for r in rows]
    logits, cache = model.prefill([list(k) for k in unique], room=room)
    if len(unique) == len(rows) and owner == list(range(len(rows))):
        return logits, cache
    return logits[owner], cache.select(owner)


@dataclass
class _Stops:
    """When a row is done: EOS, a stop string, its token budget or the context's end."""

    eos: set[int]
    stop: tuple[str, ...]
    max_new_tokens: int
    max_positions: int
    need_text: bool  # decode each step (stop strings, streaming), not only at the end

    def check(self, model: CausalLM, r: Row, token: int) -> str | None:
        if token in self.eos:
            r.text = model.decode(r.generated)
            return "eos"
        cut = None
        if self.need_text:
            text = model.decode(r.generated)
            cut = _find_stop(text, self.stop)
            r.text = text if cut is None else text[:cut]
        if cut is not None:
            return "stop"
        if len(r.generated) >= self.max_new_tokens or len(r.prompt_ids) + len(r.generated) >= self.max_positions:
            if not self.need_text:
                r.text = model.decode(r.generated)
            return "length"
        return None


def _decode_batch(model: CausalLM, rows: list[Row], config: GenerationConfig, processors: ProcessorList,
                  chooser: TokenChooser, on_token: OnToken | None, on_step: Callable[[int], None] | None = None
                  ) -> Iterator[Sample]:
    t0 = time.perf_counter()
    prompt = max(len(r.prompt_ids) for r in rows)
    longest = min(prompt + config.max_new_tokens, model.max_positions)
    # room for every token to come, plus the scratch a chooser runs through the cache (EPIC's trees)
    logits, cache = _prefill_rows(model, rows, longest - prompt + chooser.scratch_positions)
    for r in rows:
        r.stats = {"prompt_tokens": len(r.prompt_ids)}
    stops = _Stops(set(model.eos_token_ids), config.stop, config.max_new_tokens, model.max_positions,
                   bool(config.stop) or on_token is not None)
    holdback = max((len(s) for s in config.stop), default=0)
    stream = _StreamState()
    buffers: KVBuffers | None = None  # graphs that cannot write in place: each step's cache goes here
    active = list(rows)
    while active:
        history = np.array([r.generated for r in active], dtype=np.int64).reshape(len(active), -1)
        result = chooser.choose(model, active, logits, processors.apply(logits, history), cache)
        if on_step is not None:
            on_step(len(active))
        keep = []
        for j, (r, tok) in enumerate(zip(active, result.tokens.tolist())):
            reason = _record(model, r, int(tok), result, j, stops)
            if on_token is not None:
                stream.emit(r, reason, holdback, on_token)
            if reason is None:
                keep.append(j)
            else:
                yield _finish(r, t0)
        if not keep:
            break
        if buffers is None and result.next_cache is None:
            buffers = model.step_buffers(len(rows), longest)
        logits, cache = _advance(model, result, cache, keep, len(active), buffers)
        active = [active[j] for j in keep]


def _record(model: CausalLM, r: Row, token: int, result: StepResult, j: int, stops: _Stops) -> str | None:
    """Append the chosen token and its stats to the row; its finish reason, if it is done."""
    r.generated.append(token)
    if result.row_stats is not None:
        for k, v in result.row_stats[j].items():
            r.stats[k] = r.stats.get(k, 0) + v
    reason = stops.check(model, r, token)
    r.finish_reason = reason
    return reason


def _advance(model: CausalLM, result: StepResult, cache: KVCache, keep: list[int], rows: int,
             buffers: KVBuffers | None) -> tuple[np.ndarray, KVCache]:
    """The logits and cache after the chosen tokens of the rows that go on."""
    if result.next_logits is not None and result.next_cache is not None:
        logits, cache = result.next_logits, result.next_cache
        if len(keep) < rows:
            logits, cache = logits[keep], cache.compacted(keep)
        return logits, cache
    if len(keep) < rows:
        cache = cache.compacted(keep)
    return model.step(result.tokens[keep], cache, present_buffers=buffers.next() if buffers else None)


def _finish(r: Row, t0: float) -> Sample:
    stats = dict(r.stats)
    stats.update({"tokens": len(r.generated), "seconds": round(time.perf_counter() - t0, 4)})
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
