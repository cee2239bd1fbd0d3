"""Text in and out of an export: the fast tokenizer and the chat template, as transformers uses them.

A chat template writes its own special tokens (`<|im_start|>`, `{{ bos_token }}`, ...), so the
rendered text is tokenized *without* adding special tokens again, and the template is rendered with
the tokenizer's real special-token strings: what `transformers`' `apply_chat_template(...,
tokenize=True)` does. Getting either wrong silently doubles or drops a start token and degrades
every chat answer.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError, ModelLoadError

Message = dict[str, Any]
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ModelTokenizer:
    """The tokenizer files of one model folder (tokenizer.json, special_tokens_map.json) and its
    chat template (from the manifest)."""

    def __init__(self, model_dir: Path, chat_template: str | None):
        self.model_dir = Path(model_dir)
        self.backend = _load_backend(self.model_dir)
        self.chat_template = chat_template
        self.special_tokens = _special_tokens(self.model_dir)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: str | Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` (a string is one user message)."""
        if not self.chat_template:
            raise InvalidRequestError(f"{self.model_dir} has no chat template; send a plain prompt (drop --chat)")
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        _check_messages(msgs)
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=msgs, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.special_tokens)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"the chat template refused these messages: {e}") from None

    def encode_chat(self, messages: str | Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat: the template's own special tokens, none added."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _raise_template_error(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _check_messages(messages: list[Any]) -> None:
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"message {i} must be an object with a string \"role\" and \"content\"")


def _special_tokens(model_dir: Path) -> dict[str, str]:
    """{bos_token: '<s>', ...} as transformers passes them to a chat template ('' where unset)."""
    found: dict[str, str] = {k: "" for k in _SPECIAL_KEYS}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second wins, as in transformers
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ModelLoadError(f"{path} is corrupt; re-export with `epic-ort export --force`") from None
        for key in _SPECIAL_KEYS:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def _load_backend(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; re-export with `epic-ort export --force`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is corrupt ({str(e)[:120]}); re-export with `epic-ort export --force`") from None
