"""GGUF files for the exporter: their metadata read without gguf-py's per-element parsing, a copy
without the tokenizer's vocabulary arrays for transformers' loader, and SentencePiece-BPE
tokenizers (Gemma's) rebuilt as Hugging Face's converter builds them from the SentencePiece model.

Why: gguf-py's GGUFReader makes one NumPy view per element of every array field, and a 262k-token
vocabulary has three such arrays (tokens, scores, types): about 30 seconds a read on a CPU core,
and transformers reads a GGUF twice to load a model (config, then weights) and once more for its
tokenizer. Here the metadata is read in about a second; transformers then loads a copy of the
file whose only difference is that those three arrays are gone (and the vocabulary size, which it
would otherwise count from them, is a field), and the tokenizer is built here from the arrays.
transformers' own GGUF tokenizer for Gemma is a Unigram model over the BPE scores, which splits
common words ("world" -> "▁w", "or", "ld"); the BPE built here gives SentencePiece's pieces.

Needs only NumPy (and `tokenizers` for the tokenizer).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types (gguf-py's GGUFValueType)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {_UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i", _FLOAT32: "<f",
            _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d"}
_NUMPY = {_UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4", _FLOAT32: "<f4",
          _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8"}
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# The tokenizer's per-token arrays: what makes GGUFReader slow on a large vocabulary
VOCABULARY_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges")
# SentencePiece piece types, as llama.cpp writes them into tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass
class GGUFMetadata:
    """A GGUF file's header: every field's value (arrays of numbers as NumPy arrays, of strings as
    lists), the byte span of each field, of the tensor infos, and where the tensor data starts."""

    path: Path
    version: int
    tensor_count: int
    fields: dict[str, Any] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensor_infos: tuple[int, int] = (0, 0)
    data_offset: int = 0

    @property
    def architecture(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    @property
    def alignment(self) -> int:
        return int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))


def read_metadata(path: str | Path) -> GGUFMetadata:
    """Parse the header, fields and tensor infos of the GGUF file at `path` (the tensor data is not read)."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file")
        version, tensors, kvs = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        meta = GGUFMetadata(path, version, tensors)
        at = 24
        for _ in range(kvs):
            start = at
            key, at = _string(buf, at)
            (kind,), at = struct.unpack_from("<I", buf, at), at + 4
            value, at = _value(buf, at, kind)
            meta.fields[key], meta.spans[key] = value, (start, at)
        start = at
        for _ in range(tensors):
            _, at = _string(buf, at)
            (dims,) = struct.unpack_from("<I", buf, at)
            at += 4 + 8 * dims + 4 + 8
        meta.tensor_infos = (start, at)
        meta.data_offset = _aligned(at, meta.alignment)
    return meta


def _string(buf: Any, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, at)
    return buf[at + 8:at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n


def _value(buf: Any, at: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, at)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", buf, at)
        at += 12
        if item in _NUMPY:
            dtype = np.dtype(_NUMPY[item])
            values = np.frombuffer(buf, dtype=dtype, count=count, offset=at).copy()
            return values, at + count * dtype.itemsize
        if item == _STRING:
            out = []
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(buf, at)
                out.append(buf[at + 8:at + 8 + n].decode("utf-8", errors="replace"))
                at += 8 + n
            return out, at
        values = []
        for _ in range(count):
            v, at = _value(buf, at, item)
            values.append(v)
        return values, at
    raise GGUFError(f"unknown GGUF value type {kind}")


def _aligned(offset: int, alignment: int) -> int:
    return offset + (-offset) % alignment


def write_without_vocabulary(meta: GGUFMetadata, out: str | Path) -> Path:
    """A copy of `meta.path` at `out` without VOCABULARY_FIELDS, plus `<architecture>.vocab_size`
    (the number of tokens, which transformers would otherwise count from the removed array) when
    the file lacks it. Fields, tensor infos and tensor data are copied byte for byte; the data is
    re-aligned after the shorter header. transformers' GGUF loader reads it in seconds."""
    out = Path(out)
    dropped = [k for k in VOCABULARY_FIELDS if k in meta.fields]
    extra = b""
    size_key = f"{meta.architecture}.vocab_size"
    tokens = meta.fields.get("tokenizer.ggml.tokens")
    if size_key not in meta.fields and tokens is not None:
        name = size_key.encode()
        extra = struct.pack("<Q", len(name)) + name + struct.pack("<II", _UINT32, len(tokens))
    kv_count = len(meta.fields) - len(dropped) + (1 if extra else 0)
    with open(meta.path, "rb") as src, open(out, "wb") as dst:
        dst.write(MAGIC + struct.pack("<IQQ", meta.version, meta.tensor_count, kv_count))
        for key, (start, end) in meta.spans.items():
            if key not in dropped:
                src.seek(start)
                dst.write(src.read(end - start))
        dst.write(extra)
        start, end = meta.tensor_infos
        src.seek(start)
        dst.write(src.read(end - start))
        dst.write(b"\0" * ((-dst.tell()) % meta.alignment))
        src.seek(meta.data_offset)
        while True:
            block = src.read(16 << 20)
            if not block:
                break
            dst.write(block)
    return out


def is_sentencepiece_bpe(meta: GGUFMetadata) -> bool:
    """A SentencePiece vocabulary with scores and no merges ("llama" tokenizer model): Gemma's."""
    f = meta.fields
    return f.get("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.scores" in f and \
        "tokenizer.ggml.merges" not in f and "tokenizer.ggml.tokens" in f


def sentencepiece_bpe_tokenizer(meta: GGUFMetadata, special: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")
                                ) -> Any:
    """transformers' GemmaConverter applied to the GGUF's vocabulary (a `tokenizers.Tokenizer`):
    a byte-fallback BPE whose merges are ranked by the merged piece's score (SentencePiece BPE
    merges the best-scored adjacent pair first), spaces as "▁", no prefix space, control and
    user-defined pieces as added tokens (control ones, and `special`, special), and `<bos>`
    prepended when the file says add_bos_token."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    f = meta.fields
    pieces: list[str] = list(f["tokenizer.ggml.tokens"])
    scores = np.asarray(f["tokenizer.ggml.scores"], dtype=np.float64)
    types = np.asarray(f.get("tokenizer.ggml.token_type", np.full(len(pieces), NORMAL)), dtype=np.int64)
    if "\t" not in pieces and "<0x09>" in pieces:  # as GemmaConverter: older Gemma vocabularies lack a tab piece
        pieces[pieces.index("<0x09>")] = "\t"
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = _merges_by_score(pieces, scores, vocab)
    unk_id = int(f.get("tokenizer.ggml.unknown_token_id", int(np.flatnonzero(types == UNKNOWN)[0])
                       if (types == UNKNOWN).any() else 0))
    tok = Tokenizer(BPE(vocab, merges, unk_token=pieces[unk_id], fuse_unk=True, byte_fallback=True, dropout=None))
    added = [AddedToken(pieces[i], normalized=False, special=bool(types[i] == CONTROL or pieces[i] in special))
             for i in np.flatnonzero((types == CONTROL) | (types == USER_DEFINED)).tolist()]
    tok.add_tokens(added)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = f.get("tokenizer.ggml.bos_token_id")
    if f.get("tokenizer.ggml.add_bos_token", True) and bos is not None:
        b = pieces[int(bos)]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, int(bos))])
    return tok


def _merges_by_score(pieces: list[str], scores: np.ndarray, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' own generate_merges (its SentencePiece converters' ranking): every split of
    every piece into two pieces of the vocabulary, the best-scored merged piece first."""
    from transformers.convert_slow_tokenizer import generate_merges

    return generate_merges(vocab, list(zip(pieces, scores.tolist())))
