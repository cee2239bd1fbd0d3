"""An exported causal LM on ONNX Runtime: the session and its forward pass.

`CausalLM.forward` binds the cache (runtime/cache.py) as past and present: on the lean graph (CPU)
the attention writes the new keys/values into the room of the buffers it reads, elsewhere ORT's
present tensors (OrtValues) become the next past through IO binding. Logits land in NumPy buffers
of ours, never in ORT's arena.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ModelLoadError, NumericalError
from .cache import BufferWrites, KVBuffers, KVCache, _BoundBuffers, cache_buffers
from .device_kv import DeviceKV
from .graph import GraphSpec
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .providers import device_of, resolve_providers
from .tokenizer import ModelTokenizer


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
        self.device_ops = DeviceKV(self.providers, self.device, lambda: default_session_options(threads))
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
        self.tokenizer = ModelTokenizer(self.model_dir, self.manifest.chat_template)
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

    @property
    def forks_on_device(self) -> bool:
        """Caches of ORT's tensors are forked by the provider (device_kv.py), not through NumPy: on a
        GPU that saves copying the whole cache to the host and back at every fork. On the CPU NumPy's
        gather is the faster of the two (EPIC on Optimum's graph: about 15%), so it stays there."""
        return self.device != "cpu"

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

    def step_buffers(self, rows: int, max_length: int) -> KVBuffers | None:
        """Destinations for plain decoding's present cache on graphs that cannot write in place
        (CPU only), so ORT's arena does not keep every step's high-water mark; None where unneeded."""
        if self.device != "cpu" or self.kv_in_place:
            return None
        elements = rows * self.spec.num_kv_heads * max_length * self.spec.head_dim
        return KVBuffers(len(self.spec.present_names), elements, self.spec.kv_dtype)

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
        With `kv_in_place` the new keys/values go into the room after `cache.length`
        (`KVCache.room_for_step`: grown or forked as needed) and the result shares its buffers.
        `scratch`: the tokens are a lookahead's, which the next continuation of `cache` may overwrite.
        Otherwise `present_buffers` (flat arrays, one per cache tensor, from `KVBuffers`) receive
        the new cache instead of ORT's allocator (CPU only; a buffer too small is ignored).
        Logits are float32 [rows, V] (last position), [rows, T, V] with last_only=False, or
        [n, V] at the n (row, position) pairs of `logits_at` (graphs with `logits_index` compute
        only those; others compute all and pick).
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        rows, t = input_ids.shape
        input_mask = np.ones((rows, t), dtype=np.int64) if input_mask is None else np.asarray(input_mask, np.int64)
        mask = np.concatenate([cache.attention_mask, input_mask], axis=1)
        positions = _position_ids(cache, input_mask) if positions is None else positions
        if tree_mask is not None and not self.spec.tree_mask:
            raise ValueError("this graph takes no tree_mask (export with --graph lean)")
        in_place = self.kv_in_place
        if in_place:
            cache = cache.room_for_step(t, scratch)
        reuse = in_place and cache.bound is not None and cache.bound.holds(cache.values)
        binding = cache.bound.binding if reuse else self.session.io_binding()  # type: ignore[union-attr]
        self._bind_step_inputs(binding, input_ids, mask, positions.astype(np.int64), tree_mask)
        wanted = _wanted_logits(rows, t, last_only, logits_at)
        logits_out = self._bind_logits(binding, rows, t, wanted, logits_at)
        if not reuse:
            past = cache.values if in_place or cache.capacity == cache.length else cache.tensors()
            _bind_past(binding, self.spec.past_names, past)
        views = self._bind_present(binding, cache, rows, t, in_place, reuse, present_buffers)
        self.session.run_with_iobinding(binding)
        self.calls.add(rows, rows * t)
        # every output in a buffer of ours (the usual CPU case): no OrtValue wrappers to make
        outputs = binding.get_outputs() if logits_out is None or any(v is None for v in views) else [None] * (1 + len(views))
        logits = self._shape_logits(outputs[0].numpy() if logits_out is None else logits_out, rows, t, wanted,
                                    logits_at, last_only)
        new_cache = KVCache(values=[v if v is not None else o for v, o in zip(views, outputs[1:])],
                            attention_mask=mask, next_position=cache.next_position + input_mask.sum(axis=1),
                            writes=cache.writes if in_place else None,
                            bound=_BoundBuffers(binding, list(cache.values)) if in_place else None,
                            device_ops=self.device_ops if self.forks_on_device and not in_place else None)
        return logits, new_cache

    def _bind_step_inputs(self, binding: Any, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                          tree_mask: np.ndarray | None) -> None:
        binding.bind_cpu_input(self.spec.input_ids, input_ids)
        if self.spec.attention_mask:
            binding.bind_cpu_input(self.spec.attention_mask, np.ascontiguousarray(mask))
        if self.spec.position_ids:
            binding.bind_cpu_input(self.spec.position_ids, np.ascontiguousarray(positions))
        if self.spec.tree_mask:
            tree = _NO_TREE if tree_mask is None else np.ascontiguousarray(tree_mask, dtype=bool)
            binding.bind_cpu_input(self.spec.tree_mask, tree)

    def _bind_logits(self, binding: Any, rows: int, t: int, wanted: np.ndarray | None,
                     logits_at: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
        """Bind the positions that reach the lm_head and the logits output (into a NumPy buffer of
        ours on the CPU: ORT's arena would keep the largest logits ever made, EPIC's trees' ~100 MB,
        for the rest of the session). Returns that buffer, or None where ORT allocates."""
        if self.spec.logits_index:
            index = np.arange(rows * t, dtype=np.int64) if wanted is None else wanted
            binding.bind_cpu_input(self.spec.logits_index, np.ascontiguousarray(index))
            shape = [index.size, self.vocab_size]
        elif self.spec.logits_to_keep:  # lean exports before logits_index
            keep = 1 if wanted is not None and logits_at is None else 0
            binding.bind_cpu_input(self.spec.logits_to_keep, np.array([keep], dtype=np.int64))
            shape = [rows, keep or t, self.vocab_size]
        else:
            shape = [rows, t, self.vocab_size]
        if self.device == "cpu" and self.spec.vocab_size:
            out = np.empty(shape, dtype=self.spec.logits_dtype)
            binding.bind_output(self.spec.logits, "cpu", 0, out.dtype, shape, out.ctypes.data)
            return out
        binding.bind_output(self.spec.logits, "cpu")
        return None

    def _bind_present(self, binding: Any, cache: KVCache, rows: int, t: int, in_place: bool, reuse: bool,
                      present_buffers: Sequence[np.ndarray] | None) -> list[np.ndarray | None]:
        """Bind each present output: to its past buffer (in place), to a preallocated buffer, or to
        ORT (None in the list: read it from the binding's outputs)."""
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
        return views

    def _shape_logits(self, logits: np.ndarray, rows: int, t: int, wanted: np.ndarray | None,
                      logits_at: tuple[np.ndarray, np.ndarray] | None, last_only: bool) -> np.ndarray:
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
        return logits

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
        return self.tokenizer.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages: str | Sequence[dict[str, Any]]) -> str:
        """The chat template rendered for `messages` (a string: one user message), generation prompt
        included; tokenize it with `encode(..., add_special_tokens=False)`, or use `encode_chat`."""
        return self.tokenizer.render_chat(messages)

    def encode_chat(self, messages: str | Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of the chat prompt, as transformers' apply_chat_template(tokenize=True) gives them."""
        return self.tokenizer.encode_chat(messages)


_NO_TREE = np.ones((1, 1, 1), dtype=bool)  # broadcast: padding and causality alone


def _position_ids(cache: KVCache, input_mask: np.ndarray) -> np.ndarray:
    """As transformers' generate(): the running count of real tokens minus one, padding set to 1."""
    positions = cache.next_position[:, None] + np.cumsum(input_mask, axis=1) - 1
    return np.where(input_mask == 0, 1, positions)


def _wanted_logits(rows: int, t: int, last_only: bool, logits_at: tuple[np.ndarray, np.ndarray] | None
                   ) -> np.ndarray | None:
    """Flat (row * T + position) indices of the logits asked for, or None for all."""
    if logits_at is not None:
        return np.asarray(logits_at[0], dtype=np.int64) * t + np.asarray(logits_at[1], dtype=np.int64)
    if last_only:
        return np.arange(rows, dtype=np.int64) * t + (t - 1)
    return None


def _bind_past(binding: Any, names: Sequence[str], values: Sequence[Any]) -> None:
    for name, value in zip(names, values):
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        else:
            binding.bind_ortvalue_input(name, value)


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
