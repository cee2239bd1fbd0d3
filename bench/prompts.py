"""The prompts every engine gets: exactly N tokens of real prose (BOS included, as every engine's
tokenizer adds it), taken from the excerpts shipped in the package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parent / "epic_ort" / "data"
PROSE_FILES = ("pride_and_prejudice_excerpt.txt", "sense_and_sensibility_excerpt.txt", "northanger_abbey_excerpt.txt")


def _paragraphs() -> list[str]:
    """The bundled prose with the hard line wraps undone: one string per paragraph."""
    out: list[str] = []
    for name in PROSE_FILES:
        text = (DATA_DIR / name).read_text(encoding="utf-8")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if para:
                out.append(para)
    return out


def build_prompts(tokenizer_json: Path, length: int, count: int = 1) -> list[dict[str, Any]]:
    """`count` distinct prompts (different places in the prose) of exactly `length` tokens.

    Takes the first tokens of a window, decodes them back to text and re-encodes the text
    (BOS added, as the engines do) until the count is exactly `length`; refuses text that ends in
    whitespace (a dangling space is a token no real prompt would end with). Prompts end mid-
    sentence, so an end-of-sequence token within the next few hundred tokens is unlikely.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    paras = _paragraphs()
    prompts = []
    for i in range(count):
        start = (i * 9) % len(paras)
        chunk, j = [], start
        while sum(len(c) for c in chunk) < length * 8 + 400:  # ~4 chars/token, plenty of margin
            chunk.append(paras[j % len(paras)])
            j += 1
        ids = tok.encode("\n\n".join(chunk), add_special_tokens=False).ids
        with_special = len(tok.encode("x", add_special_tokens=True).ids) - len(tok.encode("x", add_special_tokens=False).ids)
        base = length - with_special
        found = None
        for delta in (0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6):
            m = base + delta
            if m < 1 or m > len(ids):
                continue
            text = tok.decode(ids[:m])
            if not text or text != text.rstrip():
                continue
            check = tok.encode(text, add_special_tokens=True).ids
            if len(check) == length:
                found = {"text": text, "ids": list(check)}
                break
        if found is None:
            raise RuntimeError(f"could not build a prompt of exactly {length} tokens from window {i}")
        prompts.append(found)
    return prompts
