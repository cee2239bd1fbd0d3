"""Each method's generations and scores, kept under `--out` as they finish, so a long evaluation can be
interrupted and resumed, and a rerun with more methods, more passages or a judge reuses what is done.

One JSONL file a method (and one a method's judge scores): a header line with the key (everything the
lines depend on: model, corpus, the order passages are drawn in, the method's full settings; the
judge), then one line a passage. The file's name carries a digest of the key, so other settings never
read these lines; a line cut off by a kill is dropped on reading.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_text_atomic

FORMAT = "epic-ort-generations/1"


@dataclass
class Scored:
    """Per-passage results of one row of the table (a method, or the human text)."""

    tokens: list[list[int]] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    surprisals: list[np.ndarray] = field(default_factory=list)  # −log q of each token, base model
    entropies: list[np.ndarray] = field(default_factory=list)  # H(q(.|prefix)) before each token
    judge_nll: list[np.ndarray] = field(default_factory=list)  # the judge's −log p of the text's tokens
    seconds: float = 0.0


@dataclass
class Record:
    index: int  # the passage
    tokens: list[int]
    finish: str
    surprisals: np.ndarray
    entropies: np.ndarray
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "tokens": self.tokens, "finish": self.finish,
                "surprisals": rounded(self.surprisals), "entropies": rounded(self.entropies),
                "seconds": round(self.seconds, 4)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Record":
        return cls(int(d["index"]), [int(t) for t in d["tokens"]], str(d["finish"]),
                   np.asarray(d["surprisals"], dtype=np.float64), np.asarray(d["entropies"], dtype=np.float64),
                   float(d.get("seconds", 0.0)))


def rounded(a: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in a]


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", name)[:80]


class KeyedLines:
    """A JSONL file of per-passage objects under one key (nothing at all without a folder)."""

    def __init__(self, folder: str | Path | None, kind: str, name: str, key: dict[str, Any]):
        self.key = json.loads(json.dumps({"format": FORMAT, **key}, sort_keys=True, default=str))
        self.path = None if folder is None else Path(folder) / kind / f"{slug(name)}.{key_digest(self.key)}.jsonl"
        self._file: Any = None

    def load(self) -> dict[int, dict[str, Any]]:
        """The passages done so far, by index."""
        if self.path is None or not self.path.is_file():
            return {}
        done: dict[int, dict[str, Any]] = {}
        good: list[str] = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
            try:
                obj = json.loads(line)
                if i == 0:
                    if obj.get("key") != self.key:
                        return {}
                else:
                    done[int(obj["index"])] = obj
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by a kill
            good.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in good))  # without the cut-off line
        return done

    def append(self, obj: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.is_file() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", encoding="utf-8")
            if fresh:
                self._file.write(json.dumps({"key": self.key}) + "\n")
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MethodStore:
    """The generations of one method (or the human text)."""

    def __init__(self, folder: str | Path | None, name: str, key: dict[str, Any]):
        self.name = name
        self.lines = KeyedLines(folder, "generations", name, key)

    def load(self) -> dict[int, Record]:
        return {i: Record.from_json(obj) for i, obj in self.lines.load().items()}

    def append(self, rec: Record) -> None:
        self.lines.append(rec.to_json())

    def close(self) -> None:
        self.lines.close()

    def judge_store(self, folder: str | Path | None, judge: dict[str, str]) -> KeyedLines:
        """Where the judge's scores of these generations go: keyed by them and by the judge."""
        return KeyedLines(folder, "judge", self.name, {"generations": self.lines.key, "judge": judge})
