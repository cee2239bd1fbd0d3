"""An exported causal LM on ONNX Runtime: session, tokenizer, manifest and the KV cache.

The cache never round-trips through freshly allocated arrays. On the lean graph (CPU) it is one
set of NumPy buffers with room for the tokens to come: each step binds its present outputs to
them and the attention writes the new keys/values in place (`CausalLM.kv_in_place`). Other
graphs, and the GPU, hand ORT's present tensors (OrtValues) back as the next step's past through
IO binding. Either way `KVCache.select` (the fork primitive EPIC's lookahead is built on) is a
single gather per tensor.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ModelLoadError, NumericalError
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .providers import device_of, resolve_providers

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Model metadata of graphs whose attention writes the new keys/values into the past buffers
# themselves when the present outputs are bound to them (ORT's GroupQueryAttention): the cache
# is then one set of buffers, appended in place, instead of a new concatenated copy per step.
KV_CACHE_KEY, KV_CACHE_SHARED = "epic_ort.kv_cache", "shared_buffer"


@dataclass(frozen=True)
class GraphSpec:
    """What the runtime needs to know about the graph's inputs and outputs, read from the graph."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    past_names: tuple[str, ...]
    present_names: tuple[str, ...]
    logits: str
    logits_index: str | None  # lean graphs: which positions get logits (flat row * T + position)
    logits_to_keep: str | None  # lean graphs exported before logits_index: trailing positions with logits
    tree_mask: str | None  # lean graphs only: which keys each new token sees (token trees for EPIC)
    shared_kv: bool  # lean graphs only: past and present may be one buffer, written in place
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None
    kv_dtype: Any
    logits_dtype: Any

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
            logits_index="logits_index" if "logits_index" in inputs else None,
            logits_to_keep="logits_to_keep" if "logits_to_keep" in inputs else None,
            tree_mask="tree_mask" if "tree_mask" in inputs else None,
            shared_kv=session.get_modelmeta().custom_metadata_map.get(KV_CACHE_KEY) == KV_CACHE_SHARED,
            num_layers=len(past) // 2,
            num_kv_heads=heads,
            head_dim=head_dim,
            vocab_size=vocab if isinstance(vocab, int) else None,
            kv_dtype=_ORT_FLOAT.get(inputs[past[0]].type, np.float32),
            logits_dtype=_ORT_FLOAT.get(outputs["logits"].type, np.float32),
        )


def _kv_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[-2]), 0 if parts[-1] == "key" else 1


@dataclass
class BufferWrites:
    """How far a set of cache buffers has been written, shared by all caches on those buffers,
    and whether what lies past a cache's length is scratch (EPIC's token trees) or a real
    continuation of it."""

    end: int
    scratch: bool = False


@dataclass
class KVCache:
    """Past keys/values of a batch of rows, all padded on the left to the same length.

    `attention_mask` [rows, length] marks real tokens; `next_position` [rows] is the position id
    the next token of each row gets. `values` are [rows, kv_heads, capacity, head_dim] with
    capacity >= length: on graphs that write the cache in place (`CausalLM.kv_in_place`) the slots
    after `length` are room for the next tokens, so appending copies nothing. A cache's own slots
    are never written. Continuing a cache a second time (a fork: its room already holds another
    continuation) copies it first, so no continuation is overwritten; scratch may be.
    """

    values: list[Any]  # OrtValues (or NumPy arrays) [rows, kv_heads, capacity, head_dim]
    attention_mask: np.ndarray
    next_position: np.ndarray
    writes: BufferWrites | None = None  # NumPy buffers with room (in-place graphs) only
    bound: "_BoundBuffers | None" = field(default=None, repr=False, compare=False)

    @property
    def room_is_free(self) -> bool:
        """Nothing continues this cache in its room yet (true too of tensors that have no room of
        ours: appending to them copies anyway), so appending need not fork it."""
        w = self.writes
        return w is None or w.end <= self.length or w.scratch

    @property
    def rows(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    @property
    def capacity(self) -> int:
        v = self.values[0]
        return int(v.shape[2] if isinstance(v, np.ndarray) else v.shape()[2])

    def tensors(self) -> list[np.ndarray]:
        """The filled part of each cache tensor, [rows, kv_heads, length, head_dim] (views on the CPU)."""
        return [as_numpy(v)[:, :, : self.length] for v in self.values]

    def select(self, rows: Sequence[int] | np.ndarray, room: int | None = None) -> "KVCache":
        """Gather (and repeat) rows into new tensors: one gather per tensor, whatever the number
        of rows. The copy keeps the room this cache has, or gets `room` free slots. Used for the
        fork that tiles a prefix to many lookahead rows, and to share one prefill among samples."""
        idx = np.asarray(rows, dtype=np.int64)
        capacity = self.capacity if room is None else self.length + room
        if capacity == self.length == self.capacity:
            values, writes = [_take_rows(v, idx) for v in self.values], None
        else:
            values, writes = _gather_slots(self.values, idx, self.length, capacity), BufferWrites(self.length)
        return KVCache(values=values, attention_mask=self.attention_mask[idx], next_position=self.next_position[idx],
                       writes=writes)

    def compacted(self, rows: Sequence[int] | np.ndarray) -> "KVCache":
        """Rows `rows` (ascending), moved to the front of this cache's own buffers: how the decoding
        loop drops finished rows without a second copy of the cache. This cache is used up."""
        idx = np.asarray(rows, dtype=np.int64)
        if not all(isinstance(v, np.ndarray) for v in self.values) or (idx.size and np.any(np.diff(idx) <= 0)):
            return self.select(idx)
        n = self.length
        for v in self.values:
            for dst, src in enumerate(idx.tolist()):
                if dst != src:
                    v[dst, :, :n] = v[src, :, :n]
        return KVCache(values=[v[: idx.size] for v in self.values], attention_mask=self.attention_mask[idx],
                       next_position=self.next_position[idx], writes=self.writes)

    def reserve(self, extra: int, headroom: int = 0, used: int | None = None) -> "KVCache":
        """Make room for `extra` more tokens after the first `used` slots (default: the length):
        if there is too little, this cache moves to new NumPy buffers with room for
        extra + headroom, keeping those slots (a copy; caches that shared the old buffers keep
        them). Everyone holding this cache then sees the room, e.g. a decoding loop whose cache
        EPIC's lookahead grew for its trees (`used` then covers the tree so far). Returns the cache."""
        used = self.length if used is None else used
        if self.capacity < used + extra or self.writes is None:
            self.values = _gather_slots(self.values, np.arange(self.rows), used, used + extra + headroom)
            self.writes = BufferWrites(used, scratch=used > self.length)
        return self

    @staticmethod
    def concat(caches: Sequence["KVCache"]) -> "KVCache":
        """Stack rows of caches that have the same length (used to merge lookahead winners)."""
        if len(caches) == 1:
            return caches[0]
        lengths = {c.length for c in caches}
        if len(lengths) != 1:
            raise ValueError(f"cannot concat caches of lengths {sorted(lengths)}")
        parts = [c.tensors() for c in caches]
        return KVCache(
            values=[np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))],
            attention_mask=np.concatenate([c.attention_mask for c in caches]),
            next_position=np.concatenate([c.next_position for c in caches]),
        )


@dataclass
class _BoundBuffers:
    """An IO binding that has a cache's buffers bound as both past and present (in-place graphs).
    The next step on the same buffers rebinds only the small per-call inputs: binding 2 x layers
    tensors anew costs about as much as the sampling of a batch-1 step."""

    binding: Any
    values: list[np.ndarray]  # the arrays bound, in past_names order; keeps them alive

    def holds(self, values: Sequence[Any]) -> bool:
        return len(values) == len(self.values) and all(a is b for a, b in zip(values, self.values))


def as_numpy(v: Any) -> np.ndarray:
    """A cache tensor as a NumPy array (an OrtValue is copied to the host)."""
    return v if isinstance(v, np.ndarray) else v.numpy()


def _gather_slots(values: Sequence[Any], idx: np.ndarray, slots: int, capacity: int) -> list[np.ndarray]:
    """Rows idx of each cache tensor, its first `slots` positions, in new buffers of `capacity`."""
    first = as_numpy(values[0])
    out = cache_buffers(len(values), (idx.size, first.shape[1], capacity, first.shape[3]), first.dtype)
    for v, buf in zip(values, out):
        np.take(as_numpy(v)[:, :, :slots], idx, axis=0, out=buf[:, :, :slots], mode="clip")
    return out


def cache_buffers(count: int, shape: tuple[int, ...], dtype: Any) -> list[np.ndarray]:
    """`count` uninitialized cache tensors, carved out of one allocation. One large block goes
    back to the OS when freed; dozens of few-MB arrays would stay in the C heap's free lists (a
    decoding cache that grew once would keep its old size in RSS for good)."""
    block = np.empty((count, *shape), dtype=dtype)
    return list(block)


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
    """A loaded export. Thread-safe: it holds no per-request state (an IO binding lives with the cache
    it binds, i.e. with one request)."""

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
            graph=self.manifest.graph,
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

    @property
    def kv_in_place(self) -> bool:
        """Each step writes its keys/values into the room of the cache it continues (CPU, lean
        graphs): one copy of the cache lives, not the past plus a concatenated present. Elsewhere
        every step returns a new cache tensor from ORT."""
        return self.spec.shared_kv and self.device == "cpu"

    def empty_cache(self, rows: int, capacity: int = 0) -> KVCache:
        """A cache of no tokens, with room for `capacity` (on graphs that write in place)."""
        capacity = capacity if self.kv_in_place else 0
        shape = (rows, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        values = cache_buffers(len(self.spec.past_names), shape, self.spec.kv_dtype) if capacity else \
            [np.zeros(shape, dtype=self.spec.kv_dtype)] * len(self.spec.past_names)
        return KVCache(
            values=values,
            writes=BufferWrites(0) if capacity else None,
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
        logits_at: tuple[np.ndarray, np.ndarray] | None = None,
        scratch: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """Run new tokens [rows, T] on top of `cache`; return logits and the extended cache.

        `input_mask` marks left padding in a prefill (and unused slots of a token tree). Position
        ids follow transformers' generate(): cumulative count of real tokens minus one, padding set
        to 1, unless `positions` [rows, T] gives them. `tree_mask` [rows, T, length + T] (bool)
        restricts which keys each new token sees (graphs with `supports_trees` only).
        With `kv_in_place` the new keys/values go into the room after `cache.length` and the
        result shares the buffers of `cache`. A cache without room for T first moves to bigger
        buffers (with some to spare, so a decoding loop grows now and then, not every step); one
        whose room holds another continuation already is copied first (a fork). `scratch`: the
        tokens are a lookahead's, which the next continuation of `cache` may overwrite.
        Otherwise `present_buffers` (flat arrays, one per cache tensor, from `KVBuffers`) receive
        the new cache instead of ORT's allocator (CPU only; a buffer too small is ignored).
        Logits are float32 [rows, V] (last position), [rows, T, V] with last_only=False, or
        [n, V] at the n (row, position) pairs of `logits_at` (graphs with `logits_index` compute
        only those; others compute all and pick).
        """
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
        in_place = self.kv_in_place
        if in_place:
            if cache.room_is_free:
                cache.reserve(t, headroom=growth_headroom(cache.length, t))
            else:
                cache = cache.select(np.arange(rows), room=t + growth_headroom(cache.length, t))
            cache.writes.end, cache.writes.scratch = cache.length + t, scratch  # type: ignore[union-attr]

        reuse = in_place and cache.bound is not None and cache.bound.holds(cache.values)
        binding = cache.bound.binding if reuse else self.session.io_binding()  # type: ignore[union-attr]
        binding.bind_cpu_input(self.spec.input_ids, input_ids)
        if self.spec.attention_mask:
            binding.bind_cpu_input(self.spec.attention_mask, np.ascontiguousarray(mask))
        if self.spec.position_ids:
            binding.bind_cpu_input(self.spec.position_ids, np.ascontiguousarray(positions))
        if self.spec.tree_mask:
            tree = _NO_TREE if tree_mask is None else np.ascontiguousarray(tree_mask, dtype=bool)
            binding.bind_cpu_input(self.spec.tree_mask, tree)
        wanted = None  # flat (row * T + position) indices of the logits asked for, or None for all
        if logits_at is not None:
            wanted = np.asarray(logits_at[0], dtype=np.int64) * t + np.asarray(logits_at[1], dtype=np.int64)
        elif last_only:
            wanted = np.arange(rows, dtype=np.int64) * t + (t - 1)
        if self.spec.logits_index:
            index = np.arange(rows * t, dtype=np.int64) if wanted is None else wanted
            binding.bind_cpu_input(self.spec.logits_index, np.ascontiguousarray(index))
            logits_shape = [index.size, self.vocab_size]
        elif self.spec.logits_to_keep:  # lean exports before logits_index
            keep = 1 if wanted is not None and logits_at is None else 0
            binding.bind_cpu_input(self.spec.logits_to_keep, np.array([keep], dtype=np.int64))
            logits_shape = [rows, keep or t, self.vocab_size]
        else:
            logits_shape = [rows, t, self.vocab_size]
        past_values = cache.values if in_place or cache.capacity == cache.length else cache.tensors()
        for name, value in zip(self.spec.past_names, [] if reuse else past_values):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        logits_out = None
        if self.device == "cpu" and self.spec.vocab_size:
            # a NumPy buffer, not ORT's arena: the arena would keep the largest logits ever made
            # (EPIC's trees: up to ~100 MB) for the rest of the session
            logits_out = np.empty(logits_shape, dtype=self.spec.logits_dtype)
            binding.bind_output(self.spec.logits, "cpu", 0, logits_out.dtype, logits_shape, logits_out.ctypes.data)
        else:
            binding.bind_output(self.spec.logits, "cpu")
        shape = (rows, self.spec.num_kv_heads, cache.length + t, self.spec.head_dim)
        size = int(np.prod(shape))
        views: list[np.ndarray | None] = []
        for i, name in enumerate(self.spec.present_names):
            buf = present_buffers[i] if present_buffers is not None and self.device == "cpu" else None
            if in_place:
                past = cache.values[i]
                if not reuse:
                    binding.bind_output(name, "cpu", 0, past.dtype, list(past.shape), past.ctypes.data)
                views.append(past)
            elif buf is not None and buf.size >= size:
                view = buf[:size].reshape(shape)
                binding.bind_output(name, "cpu", 0, view.dtype, list(shape), view.ctypes.data)
                views.append(view)
            else:
                binding.bind_output(name, self.device)
                views.append(None)
        self.session.run_with_iobinding(binding)
        self.calls.add(rows, rows * t)
        # every output in a buffer of ours (the usual CPU case): no OrtValue wrappers to make
        outputs = binding.get_outputs() if logits_out is None or any(v is None for v in views) else [None] * (1 + len(views))
        logits = outputs[0].numpy() if logits_out is None else logits_out
        if self.spec.logits_index:
            if wanted is None:
                logits = logits.reshape(rows, t, -1)
        elif logits_at is not None:
            logits = logits[logits_at[0], logits_at[1]]
        elif last_only:
            logits = logits[:, -1, :]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        check_finite(logits)
        new_cache = KVCache(
            values=[v if v is not None else o for v, o in zip(views, outputs[1:])],
            attention_mask=mask,
            next_position=cache.next_position + input_mask.sum(axis=1),
            writes=cache.writes if in_place else None,
            bound=_BoundBuffers(binding, list(cache.values)) if in_place else None,
        )
        return logits, new_cache

    @property
    def supports_trees(self) -> bool:
        """The graph takes a token tree in one row (`tree_mask`): EPIC's lookahead then shares the
        prefix cache between all candidates instead of copying it to each."""
        return self.spec.tree_mask is not None

    def prefill(self, token_rows: Sequence[Sequence[int]], room: int = 0) -> tuple[np.ndarray, KVCache]:
        """Left-pad the rows to one length and run them at once; logits of each row's last token.
        `room`: tokens the cache should have space for after the prompt (decoding length)."""
        ids, mask = left_pad(token_rows, pad_id=self.manifest.pad_token_id or 0)
        return self.forward(ids, self.empty_cache(len(token_rows), ids.shape[1] + room), mask)

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
        self._sets = [cache_buffers(n, (size,), model.spec.kv_dtype) for _ in range(2)]
        self._turn = 0

    def next(self) -> list[np.ndarray]:
        self._turn ^= 1
        return self._sets[self._turn]


def growth_headroom(length: int, need: int) -> int:
    """Room to add, beyond the `need` slots a step takes, when an in-place cache runs out: a
    quarter of its length (geometric growth, so a cache grown step by step is copied O(log n)
    times) and at least `need` again. Not a fixed number of slots: a fork of 1,000 short rows
    would pay for it 1,000 times."""
    return max(need, length // 4)


_NO_TREE = np.ones((1, 1, 1), dtype=bool)  # broadcast: padding and causality alone


def check_finite(logits: np.ndarray) -> None:
    """Refuse NaN or +inf logits (-inf is a legitimate mask): sampling from them is silent garbage.
    A row that is -inf everywhere has no token to sample at all, so it is refused too."""
    # a row's max is NaN, +inf or -inf exactly when the row has a NaN, a +inf, or nothing but -inf:
    # one reduction, no boolean array of the logits' size
    if not np.isfinite(np.max(logits, axis=-1)).all():
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
