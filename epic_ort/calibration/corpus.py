"""Real text for calibration and evaluation: files in, token contexts out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidRequestError
from ..fileio import sha256_file
from ..runtime.model import CausalLM


def default_corpus() -> list[Path]:
    """Public-domain prose shipped with the package (excerpts of three Austen novels)."""
    folder = resources.files("epic_ort") / "data"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".txt"))


def read_prose(path: Path) -> str:
    """A text file as running prose: hard-wrapped lines inside a paragraph are joined, as a
    model sees text (paragraphs stay separated by a blank line)."""
    if not path.is_file():
        raise InvalidRequestError(f"corpus file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(f"corpus file {path} is not UTF-8 text") from None
    return "\n\n".join(" ".join(par.split()) for par in text.split("\n\n") if par.strip())


@dataclass
class Corpus:
    paths: list[Path]
    tokens: np.ndarray  # all files, tokenized without special tokens, concatenated
    bos: list[int]  # what the tokenizer puts in front of a text (may be empty)

    def describe(self) -> list[dict[str, str]]:
        return [{"path": str(p), "sha256": sha256_file(p)} for p in self.paths]


def load_corpus(model: CausalLM, paths: Sequence[str | os.PathLike] | None = None) -> Corpus:
    files = [Path(p) for p in paths] if paths else default_corpus()
    chunks = [np.array(model.encode(read_prose(p), add_special_tokens=False), dtype=np.int64) for p in files]
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    with_special = model.encode("a")
    plain = model.encode("a", add_special_tokens=False)
    bos = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
    return Corpus(files, tokens, bos)


def sample_positions(corpus: Corpus, n: int, context_tokens: int, after: int, seed: int) -> np.ndarray:
    """n distinct random positions p with a full `context_tokens` prefix before p and `after` tokens from p."""
    lo, hi = _position_range(corpus, n, context_tokens, after)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(lo, hi), size=n, replace=False))


def nested_positions(corpus: Corpus, n: int, context_tokens: int, after: int, seed: int) -> np.ndarray:
    """Like sample_positions, but the first n of one fixed random order of all positions, so that a
    larger n keeps every earlier passage at its index: an evaluation grows without redoing work."""
    lo, hi = _position_range(corpus, n, context_tokens, after)
    return lo + np.random.default_rng(seed).permutation(hi - lo)[:n]


def _position_range(corpus: Corpus, n: int, context_tokens: int, after: int) -> tuple[int, int]:
    lo, hi = context_tokens, len(corpus.tokens) - after
    if hi - lo < n:
        raise InvalidRequestError(
            f"the corpus has {len(corpus.tokens)} tokens: too short for {n} contexts of {context_tokens}+{after} tokens"
        )
    return lo, hi


def context_at(corpus: Corpus, position: int, context_tokens: int) -> list[int]:
    return corpus.bos + corpus.tokens[position - context_tokens : position].tolist()
