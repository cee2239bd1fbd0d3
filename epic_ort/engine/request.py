"""What a client hands the engine (`EngineRequest`) and what comes back (the events of its stream).

A request is one prompt's token ids, its own settings (`GenerationConfig`, the same table offline
`generate` reads) and `n` samples. Sample s of a request draws from `sample_rng(seed, prompt_index,
s)`, the stream offline `generate(model, prompts, config, num_samples=n)` gives prompt
`prompt_index` (0 by default), so a request's text is the offline text whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping, Sequence, Union

from ..decoding import Sample, resolve_seed
from ..errors import InvalidRequestError
from ..settings import GenerationConfig

if TYPE_CHECKING:
    from ..runtime.model import CausalLM

MAX_TOP_LOGPROBS = 20
PENALTY_RANGE = 2.0
BIAS_RANGE = 100.0


@dataclass(frozen=True)
class EngineRequest:
    """One prompt, its settings, `n` samples. `logprobs`: None for none, k >= 0 for the chosen
    token's log-probability and the k most likely tokens' (under the model's raw distribution).
    Penalties and logit_bias follow OpenAI (`penalties.py`)."""

    prompt_ids: Sequence[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    n: int = 1
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    prompt_index: int = 0  # its samples draw from sample_rng(seed, prompt_index, s), as offline prompt i's
    request_id: str = ""


def prepare(model: "CausalLM", request: EngineRequest, max_rows: int) -> EngineRequest:
    """The request checked (InvalidRequestError naming what is wrong), its prompt fitted to the
    context as `truncate` says, and its seed fixed (a random one when it has none)."""
    config = request.config
    config.validate()
    if not isinstance(config.alpha, float):
        raise InvalidRequestError("alpha 'auto' must be resolved before a request reaches the engine")
    if isinstance(request.n, bool) or not isinstance(request.n, int) or request.n < 1:
        raise InvalidRequestError("n must be an integer >= 1")
    if request.n > max_rows:
        raise InvalidRequestError(f"n = {request.n} is more samples than this server runs at once ({max_rows})")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -PENALTY_RANGE <= getattr(request, name) <= PENALTY_RANGE:
            raise InvalidRequestError(f"{name} must be in [-2, 2]")
    for token, value in (request.logit_bias or {}).items():
        if not 0 <= int(token) < model.vocab_size:
            raise InvalidRequestError(f"logit_bias token {token} is not in the vocabulary (0..{model.vocab_size - 1})")
        if not -BIAS_RANGE <= value <= BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias values must be in [-100, 100], not {value}")
    ids = fit_prompt(model, list(request.prompt_ids), config.truncate)
    return replace(request, prompt_ids=tuple(ids), config=replace(config, seed=resolve_seed(config.seed)))


def fit_prompt(model: "CausalLM", ids: list[int], truncate: str) -> list[int]:
    """The prompt's ids as offline `encode_prompts` leaves them: refused when empty or when they leave
    no room in the context, or cut to their end (BOS kept) with truncate="left"."""
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if any(not 0 <= t < model.vocab_size for t in ids):
        raise InvalidRequestError(f"prompt token ids must be in 0..{model.vocab_size - 1}")
    limit = model.max_positions - 1
    if len(ids) <= limit:
        return ids
    if truncate != "left":
        raise InvalidRequestError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                                  f"{model.max_positions} allows; shorten it or set truncate to 'left'")
    bos = model.manifest.bos_token_id
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (limit - len(head)):]


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of sample `index`. `text`: the text it releases ("" while held back
    because it may still become a stop string or is a partial UTF-8 character; on the sample's last
    token, all the rest). `finish_reason` (eos, stop, length) on the last token only."""

    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class SampleEvent:
    """Sample `index` is complete: the same Sample offline `generate` yields."""

    index: int
    sample: Sample


@dataclass(frozen=True)
class DoneEvent:
    """The request is over: every sample finished (`cancelled` False) or it was cancelled."""

    prompt_tokens: int
    completion_tokens: int
    cancelled: bool = False


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed in the engine (e.g. NaN logits); its stream raises `error`."""

    error: Exception


Event = Union[TokenEvent, SampleEvent, DoneEvent, ErrorEvent]
