"""An exported causal LM on ONNX Runtime: session, tokenizer, manifest and the KV cache.

The cache is kept as ORT-owned tensors (OrtValues) and handed back to the next step through
IO binding, so decoding never round-trips the cache through freshly allocated NumPy arrays.
On the CPU an OrtValue's `.numpy()` is a zero-copy view, which is what makes `KVCache.select`
(the fork primitive EPIC's lookahead is built on) a single gather per tensor.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ModelLoadError, NumericalError
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .providers import device_of, resolve_providers

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class GraphSpec:
    """What the runtime needs to know about the graph's inputs and outputs, read from the graph."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    logits: str
    logits_to_keep: str | None  # lean graphs only: how many trailing positions get logits (0: all)
    tree_mask: str | None  # lean graphs only: which keys each new token sees (token trees for EPIC)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None
    kv_dtype: Any

    @classmethod
    def from_session(cls, session: Any) -> "GraphSpec":
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise ModelLoadError("model.onnx has no input_ids/logits: not a causal LM export")
        past = tuple(sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order))
        present = tuple(sorted((n for n in outputs if n.startswith("present.")), key=_kv_order))
        if not past or len(past) != len(present):
            raise ModelLoadError(
                "model.onnx has no KV-cache inputs/outputs; export with task text-generation-with-past "
                "(`epic-ort export` does this)"
            )
        shape = inputs[past[0]].shape
        heads, head_dim = shape[1], shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ModelLoadError(f"cannot read KV heads/head size from the graph (past shape {shape})")
        vocab = outputs["logits"].shape[-1]
        return cls(
            input_ids="input_ids",
            attention_mask="attention_mask" if "attention_mask" in inputs else None,
            position_ids="position_ids" if "position_ids" in inputs else None,
            past_names=past,
            present_names=present,
            logits="logits",
            logits_to_keep="logits_to_keep" if "logits_to_keep" in inputs else None,
            tree_mask="tree_mask" if "tree_mask" in inputs else None,
            num_layers=len(past) // 2,
            num_kv_heads=heads,
            head_dim=head_dim,
            vocab_size=vocab if isinstance(vocab, int) else None,
            kv_dtype=_ORT_FLOAT.get(inputs[past[0]].type, np.float32),
        )


def _kv_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[-2]), 0 if parts[-1] == "key" else 1


@dataclass
class KVCache:
    """Past keys/values of a batch of rows, all padded on the left to the same length.

    `attention_mask` [rows, length] marks real tokens; `next_position` [rows] is the position id
    the next token of each row gets. The tensors are never mutated: every step makes a new cache.
    """

    values: list[Any]  # OrtValues (or NumPy arrays) [rows, kv_heads, length, head_dim]
    attention_mask: np.ndarray
    next_position: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def select(self, rows: Sequence[int] | np.ndarray) -> "KVCache":
        """Gather (and repeat) rows: compaction when rows finish, and the fork that tiles a
        prefix to many lookahead rows. One gather per tensor, whatever the number of rows."""
        idx = np.asarray(rows, dtype=np.int64)
        return KVCache(
            values=[_take_rows(v, idx) for v in self.values],
            attention_mask=self.attention_mask[idx],
            next_position=self.next_position[idx],
        )

    @staticmethod
    def concat(caches: Sequence["KVCache"]) -> "KVCache":
        """Stack rows of caches that have the same length (used to merge lookahead winners)."""
        if len(caches) == 1:
            return caches[0]
        lengths = {c.length for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"cannot concat caches of lengths {sorted(lengths)}")
        return KVCache(
            values=[np.concatenate([as_numpy(c.values[i]) for c in caches]) for i in range(len(caches[0].values))],
            attention_mask=np.concatenate([c.attention_mask for c in caches]),
            next_position=np.concatenate([c.next_position for c in caches]),
        )

    def nbytes(self) -> int:
        return sum(as_numpy(v).nbytes for v in self.values)


def as_numpy(v: Any) -> np.ndarray:
    """A cache tensor as a NumPy array (an OrtValue is copied to the host)."""
    return v if isinstance(v, np.ndarray) else v.numpy()


def _take_rows(v: Any, idx: np.ndarray) -> Any:
    """Rows idx of one cache tensor. The identity keeps the tensor as it is (an OrtValue stays
    where it lives, on the GPU too); anything else gathers on the host (zero-copy view on CPU)."""
    rows = v.shape[0] if isinstance(v, np.ndarray) else v.shape()[0]
    if idx.size == rows and np.array_equal(idx, np.arange(rows)):
        return v
    return np.take(as_numpy(v), idx, axis=0)


def default_session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or int(os.environ.get("EPIC_ORT_THREADS", 0)) or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class CausalLM:
    """A loaded export. Thread-safe: it holds no per-request state (IO bindings are per call)."""

    def __init__(self, model_dir: str | os.PathLike, provider: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"model folder {self.model_dir} does not exist; create it with `epic-ort export`")
        self.manifest: Manifest = _read_checked_manifest(self.model_dir)
        onnx_path = self._model_file()
        self.providers = resolve_providers(
            provider,
            self.model_dir,
            input_names=self.manifest.input_names,
            num_kv_heads=self.manifest.num_kv_heads,
            head_dim=self.manifest.head_dim,
            max_positions=self.manifest.max_positions,
            fp16=self.manifest.dtype == "fp16",
        )
        self.device = device_of(self.providers)
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), default_session_options(threads), providers=self.providers
            )
        except Exception as e:  # ORT raises its own types (Fail, InvalidProtobuf, ...)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if any(k in str(e) for k in ("NOT_IMPLEMENTED", "Could not find an implementation", "opset")):
                raise ModelLoadError(
                    f"cannot load {onnx_path}: onnxruntime {ort.__version__} lacks an operator it uses ({first}); "
                    "upgrade onnxruntime, or re-export with `epic-ort export --graph optimum`"
                ) from None
            raise ModelLoadError(
                f"cannot load {onnx_path} ({first}); the file is corrupt or truncated: re-export with `epic-ort export --force`"
            ) from None
        self.spec = GraphSpec.from_session(self.session)
        self._check_manifest()
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_token_ids = tuple(int(t) for t in self.manifest.eos_token_ids)
        self.vocab_size = int(self.spec.vocab_size or self.manifest.vocab_size)
        self.max_positions = int(self.manifest.max_positions)
        self.calls = _CallCounter()

    def _model_file(self) -> Path:
        p = self.model_dir / "model.onnx"
        if p.is_file():
            return p
        raise ModelLoadError(f"{self.model_dir}/model.onnx is missing; re-export with `epic-ort export --force`")

    def _check_manifest(self) -> None:
        m, s = self.manifest, self.spec
        problems = []
        if m.num_layers != s.num_layers:
            problems.append(f"layers {m.num_layers} vs {s.num_layers} in the graph")
        if m.num_kv_heads != s.num_kv_heads:
            problems.append(f"KV heads {m.num_kv_heads} vs {s.num_kv_heads}")
        if m.head_dim != s.head_dim:
            problems.append(f"head size {m.head_dim} vs {s.head_dim}")
        if s.vocab_size is not None and m.vocab_size != s.vocab_size:
            problems.append(f"vocab {m.vocab_size} vs {s.vocab_size}")
        if problems:
            raise ModelLoadError(
                f"{self.model_dir}: manifest disagrees with model.onnx ({'; '.join(problems)}); "
                "re-export with `epic-ort export --force`"
            )

    # -- caches -------------------------------------------------------------------------

    def empty_cache(self, rows: int) -> KVCache:
        shape = (rows, self.spec.num_kv_heads, 0, self.spec.head_dim)
        empty = np.zeros(shape, dtype=self.spec.kv_dtype)
        return KVCache(
            values=[empty] * len(self.spec.past_names),
            attention_mask=np.zeros((rows, 0), dtype=np.int64),
            next_position=np.zeros(rows, dtype=np.int64),
        )

    # -- forward ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: np.ndarray,
        cache: KVCache,
        input_mask: np.ndarray | None = None,
        last_only: bool = True,
        positions: np.ndarray | None = None,
        tree_mask: np.ndarray | None = None,
        present_buffers: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, KVCache]:
        """Run new tokens [rows, T] on top of `cache`; return logits and the extended cache.

        `input_mask` marks left padding in a prefill (and unused slots of a token tree). Position
        ids follow transformers' generate(): cumulative count of real tokens minus one, padding set
        to 1, unless `positions` [rows, T] gives them. `tree_mask` [rows, T, length + T] (bool)
        restricts which keys each new token sees (graphs with `supports_trees` only).
        `present_buffers` (flat arrays, one per cache tensor, from `KVBuffers`): ORT writes the new
        cache into them instead of allocating it (CPU only; a buffer too small is ignored).
        Logits are float32 [rows, V] (last position) or [rows, T, V] with last_only=False.
        """
        import onnxruntime as ort

        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        rows, t = input_ids.shape
        if input_mask is None:
            input_mask = np.ones((rows, t), dtype=np.int64)
        input_mask = np.asarray(input_mask, dtype=np.int64)
        mask = np.concatenate([cache.attention_mask, input_mask], axis=1)
        if positions is None:
            positions = cache.next_position[:, None] + np.cumsum(input_mask, axis=1) - 1
            positions = np.where(input_mask == 0, 1, positions)
        positions = positions.astype(np.int64)
        if tree_mask is not None and not self.spec.tree_mask:
            raise ValueError("this graph takes no tree_mask (export with --graph lean)")

        binding = self.session.io_binding()
        binding.bind_cpu_input(self.spec.input_ids, input_ids)
        if self.spec.attention_mask:
            binding.bind_cpu_input(self.spec.attention_mask, np.ascontiguousarray(mask))
        if self.spec.position_ids:
            binding.bind_cpu_input(self.spec.position_ids, np.ascontiguousarray(positions))
        if self.spec.tree_mask:
            tree = _NO_TREE if tree_mask is None else np.ascontiguousarray(tree_mask, dtype=bool)
            binding.bind_cpu_input(self.spec.tree_mask, tree)
        if self.spec.logits_to_keep:
            binding.bind_cpu_input(self.spec.logits_to_keep, np.array([1 if last_only else 0], dtype=np.int64))
        for name, value in zip(self.spec.past_names, cache.values):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.spec.logits, "cpu")
        shape = (rows, self.spec.num_kv_heads, cache.length + t, self.spec.head_dim)
        size = int(np.prod(shape))
        views: list[np.ndarray | None] = []
        for i, name in enumerate(self.spec.present_names):
            buf = present_buffers[i] if present_buffers is not None and self.device == "cpu" else None
            if buf is not None and buf.size >= size:
                view = buf[:size].reshape(shape)
                binding.bind_output(name, "cpu", 0, view.dtype, list(shape), view.ctypes.data)
                views.append(view)
            else:
                binding.bind_output(name, self.device)
                views.append(None)
        self.session.run_with_iobinding(binding)
        self.calls.add(rows, rows * t)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        if last_only:
            logits = logits[:, -1, :]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        check_finite(logits)
        new_cache = KVCache(
            values=[v if v is not None else o for v, o in zip(views, outputs[1:])],
            attention_mask=mask,
            next_position=cache.next_position + input_mask.sum(axis=1),
        )
        return logits, new_cache

    @property
    def supports_trees(self) -> bool:
        """The graph takes a token tree in one row (`tree_mask`): EPIC's lookahead then shares the
        prefix cache between all candidates instead of copying it to each."""
        return self.spec.tree_mask is not None

    def prefill(self, token_rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, KVCache]:
        """Left-pad the rows to one length and run them at once; logits of each row's last token."""
        ids, mask = left_pad(token_rows, pad_id=self.manifest.pad_token_id or 0)
        return self.forward(ids, self.empty_cache(len(token_rows)), mask)

    def step(self, tokens: np.ndarray, cache: KVCache, present_buffers: Sequence[np.ndarray] | None = None
             ) -> tuple[np.ndarray, KVCache]:
        """One decoding step: one new token per row."""
        return self.forward(np.asarray(tokens, dtype=np.int64).reshape(-1, 1), cache, present_buffers=present_buffers)

    # -- text ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, user_message: str) -> str:
        template = self.manifest.chat_template
        if not template:
            raise ModelLoadError(f"{self.model_dir} has no chat template; drop --chat")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=[{"role": "user", "content": user_message}],
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )


class KVBuffers:
    """Two preallocated sets of cache tensors, used in turn as the destination of each decoding
    step's new cache (the previous step's cache, its input, lives in the other set).

    ORT would otherwise allocate every step's present cache from its arena, which keeps the
    high-water mark of tensors that grow by one position per step: at 8 rows x 640 positions of
    SmolLM2 that slack is ~240 MB. Capacity is rows x max_length; pages are only touched as the
    cache fills. Whoever passes a set must not still need the cache that set held two steps ago
    (the plain decoding loop never does; EPIC's lookahead does not use them)."""

    def __init__(self, model: "CausalLM", rows: int, max_length: int):
        size = rows * model.spec.num_kv_heads * max_length * model.spec.head_dim
        n = len(model.spec.present_names)
        self._sets = [[np.empty(size, dtype=model.spec.kv_dtype) for _ in range(n)] for _ in range(2)]
        self._turn = 0

    def next(self) -> list[np.ndarray]:
        self._turn ^= 1
        return self._sets[self._turn]


_NO_TREE = np.ones((1, 1, 1), dtype=bool)  # broadcast: padding and causality alone


def check_finite(logits: np.ndarray) -> None:
    """Refuse NaN or +inf logits (-inf is a legitimate mask): sampling from them is silent garbage.
    A row that is -inf everywhere has no token to sample at all, so it is refused too."""
    if not np.isfinite(logits).all():
        bad = np.isnan(logits) | np.isposinf(logits) | np.isneginf(logits).all(axis=-1, keepdims=True)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0]).tolist()
            raise NumericalError(
                f"the model produced NaN/inf logits in rows {rows[:8]}; the export may be broken "
                "(try --dtype fp32 or re-export)"
            )


def _read_checked_manifest(model_dir: Path) -> Manifest:
    """read_manifest, plus the types the runtime relies on: valid JSON with wrong types is corrupt too."""
    try:
        m = read_manifest(model_dir)
        counts = [getattr(m, k) for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_positions")]
        ids = m.eos_token_ids if isinstance(m.eos_token_ids, list) else [None]
        if not all(type(v) is int and v > 0 for v in counts) or not all(type(t) is int for t in ids) \
                or not isinstance(m.pad_token_id, (int, type(None))) or not isinstance(m.input_names, list):
            raise ValueError("a field has the wrong type")
        return m
    except (AttributeError, TypeError, ValueError) as e:
        why = "not a JSON object" if isinstance(e, AttributeError) else str(e)
        raise ModelLoadError(
            f"{Path(model_dir) / MANIFEST_NAME} is corrupt ({why}); re-export the model with `epic-ort export --force`"
        ) from None


def left_pad(token_rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in token_rows)
    ids = np.full((len(token_rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_rows), width), dtype=np.int64)
    for i, row in enumerate(token_rows):
        if len(row):
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return ids, mask


def _load_tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; re-export with `epic-ort export --force`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path} is corrupt ({str(e)[:120]}); re-export with `epic-ort export --force`") from None


class _CallCounter:
    """Counts ORT calls, rows and positions (rows x new tokens, padding included: what the weights
    were applied to). EPIC reports forward passes and lookahead work per token from them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.rows = 0
        self.positions = 0

    def add(self, rows: int, positions: int) -> None:
        with self._lock:
            self.calls += 1
            self.rows += rows
            self.positions += positions


def load(model_dir: str | os.PathLike, provider: str = "auto", threads: int | None = None) -> CausalLM:
    """Load an epic-ort export folder (see `epic-ort export`)."""
    return CausalLM(model_dir, provider=provider, threads=threads)
