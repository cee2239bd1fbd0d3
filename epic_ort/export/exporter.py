"""Hugging Face causal LM -> ONNX folder with KV-cache inputs/outputs.

The architectures in lean/architectures.py (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 3) get
epic-ort's lean hand-built graph (lean/: ~10 nodes per layer instead of Optimum's ~100, same inputs and
outputs; float32 for the CPU, or `--graph lean --dtype fp16` for CUDA); every other architecture, `--graph
auto --dtype fp16`, or `--graph optimum` goes through Optimum's exporter.

This is the only part of epic-ort that needs torch/transformers/optimum (the `export` extra);
they are imported inside the functions so that `import epic_ort` never pulls them in.
The folder is built in a temporary sibling and renamed at the end: an interrupted or failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from ..errors import ExportError
from ..fileio import atomic_directory, sha256_file, write_json_atomic
from ..runtime.manifest import MANIFEST_NAME, Manifest
from .sources import ALIASES, alias_names, opened_source, resolve_source  # noqa: F401 (ALIASES re-exported)


INT8_BLOCK = 32  # weights per int8 scale: small blocks keep SmolLM2's perplexity within 1% of fp32
DTYPES = ("fp32", "fp16")
QUANTIZATIONS = (None, "int8", "int8-dynamic")
GRAPHS = ("auto", "lean", "optimum")
COMPUTES = ("fp32", "int8", "int8-gemm")


def _check_options(graph: str, dtype: str, quantize: str | None, compute: str, pack: bool) -> None:
    if graph not in GRAPHS:
        raise ExportError(f"graph must be one of {GRAPHS}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {QUANTIZATIONS[1:]}")
    if quantize and dtype != "fp32":
        raise ExportError(f"--quantize {quantize} starts from an fp32 export; drop --dtype fp16")
    _check_compute(compute, dtype, quantize, graph, pack)


def export(
    model: str,
    output_dir: str | os.PathLike,
    *,
    opset: int | None = None,
    dtype: str = "fp32",
    force: bool = False,
    quantize: str | None = None,
    graph: str = "auto",
    pack: bool = True,
    compute: str = "fp32",
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Export `model` into `output_dir` and return the manifest written beside model.onnx.

    graph: "lean" (epic-ort's own graph, for the architectures of lean/architectures.py), "optimum",
    or "auto" (lean where supported, for fp32).
    dtype: "fp16" writes the lean graph in float16 (logits float32) or converts Optimum's.
    pack: in the lean graph, keep weights that are exactly 4-bit blocks (a Q4_1 GGUF's) as
    4-bit: the same numbers in 5 bits instead of 32 (export/packing.py). False stores them as floats.
    compute: "int8" runs those blocks (and a Q8_0 lm_head as 8-bit blocks) with int8 dot products,
    activations quantized per block (lean/projection.py); "fp32" computes in float32."""
    _check_options(graph, dtype, quantize, compute, pack)
    out = Path(output_dir)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    resolved = resolve_source(model)  # a missing alias package or an unknown name fails before the imports
    try:
        import torch
        from optimum.exporters.onnx import onnx_export_from_model  # noqa: F401 - the extra is complete
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ExportError(f"export needs the `export` extra ({e.name} missing): pip install 'epic-ort[export]'") from None

    with warnings.catch_warnings(), opened_source(model, resolved) as src, atomic_directory(out, force=force) as tmp:
        warnings.simplefilter("ignore")
        _quiet_libraries()
        source, kwargs, description = src.path, src.kwargs, src.description
        say(f"[1/4] loading {description}")
        try:
            tokenizer = src.tokenizer if src.tokenizer is not None else AutoTokenizer.from_pretrained(source, **kwargs)
            hf_model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32, **kwargs)
        except OSError as e:
            known = f" (known aliases: {', '.join(alias_names())})" if description.startswith("hub:") else ""
            raise ExportError(f"cannot load {model!r}: {str(e).splitlines()[0]}{known}") from None
        hf_model.eval()
        graph = _choose_graph(graph, hf_model.config, opset, dtype)
        if compute != "fp32" and graph != "lean":
            raise ExportError(f"--compute {compute} needs the lean graph, which does not support this model")
        opset, packed = _write_graph(hf_model, tmp, graph, opset, pack and not quantize, say, compute=compute,
                                     dtype=dtype, tokenizer=tokenizer)
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise ExportError(f"{model!r} has no fast tokenizer (tokenizer.json); epic-ort's runtime needs one")
        _post_process(tmp / "model.onnx", "fp32" if graph == "lean" else dtype, quantize, say)  # lean: built in fp16
        manifest = _build_manifest(tmp, hf_model.config, tokenizer, description, dtype, opset, quantize, graph)
        if graph == "lean":
            manifest.extra["packed_products"] = packed
        if compute != "fp32":
            manifest.extra["compute"] = compute
        write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
        say(f"[4/4] wrote {out}")
    return manifest


def _write_graph(hf_model: Any, tmp: Path, graph: str, opset: int | None, pack: bool,
                 say: Callable[[str], None], compute: str = "fp32", dtype: str = "fp32",
                 tokenizer: Any = None) -> tuple[int | None, int]:
    """model.onnx (and, for the lean graph, the config files Optimum would write) into `tmp`.
    Returns (the graph's opset, how many products stayed 4-bit)."""
    if graph == "lean":
        from .lean import OPSET, build_lean_onnx
        from .lean.graph import NarrowingError

        say(f"[2/4] writing the lean {hf_model.config.model_type} graph (opset {OPSET}, {dtype})")
        try:
            peaks = _smoothing_peaks(hf_model, tokenizer, say) if compute == "int8-gemm" else None
            packed = build_lean_onnx(hf_model, tmp / "model.onnx", pack_weights=pack, compute=compute,
                                     dtype=dtype, peaks=peaks)
        except NarrowingError as e:  # a weight that overflows fp16: one line, not a traceback
            raise ExportError(f"cannot write the lean graph: {e}") from None
        if packed:
            say(f"      {packed} weight products kept as their exact blocks (lossless)"
                + (", computed with int8 dot products" if compute == "int8" else ""))
        if compute == "int8-gemm":
            say("      every decoder product as int8 GEMM: int8 weights per output column, activations per token,"
                " smoothed")
        hf_model.config.save_pretrained(str(tmp))
        hf_model.generation_config.save_pretrained(str(tmp))
        return OPSET, packed
    from optimum.exporters.onnx import onnx_export_from_model

    say("[2/4] exporting to ONNX with Optimum (text-generation-with-past)")
    onnx_export_from_model(hf_model, str(tmp), opset=opset, task="text-generation-with-past", do_validation=False)
    return opset, 0


def _smoothing_peaks(hf_model: Any, tokenizer: Any, say: Callable[[str], None]) -> dict:
    """The activation peaks int8-gemm smooths with, measured on the bundled prose (lean/smoothing.py)."""
    from .lean.smoothing import activation_peaks, smoothing_text_ids

    ids = smoothing_text_ids(tokenizer)
    say(f"      measuring activation peaks on {len(ids)} tokens of the bundled prose (for smoothing)")
    return activation_peaks(hf_model, ids)


def _post_process(path: Path, dtype: str, quantize: str | None, say: Callable[[str], None]) -> None:
    if dtype == "fp16":
        say("[3/4] converting to fp16")
        _convert_fp16(path)
    elif quantize == "int8":
        say(f"[3/4] quantizing MatMul weights to int8 (weight-only, blocks of {INT8_BLOCK})")
        _quantize_int8(path)
    elif quantize == "int8-dynamic":
        say("[3/4] quantizing weights and activations to int8 (ONNX Runtime dynamic quantization)")
        _quantize_int8_dynamic(path)
    else:
        say("[3/4] checking the graph")


def _check_compute(compute: str, dtype: str, quantize: str | None, graph: str, pack: bool) -> None:
    if compute not in COMPUTES:
        raise ExportError(f"compute must be one of {COMPUTES}")
    if compute == "fp32":
        return
    clash = ("--dtype fp16" if dtype != "fp32" else f"--quantize {quantize}" if quantize else
             "--graph optimum" if graph == "optimum" else "--unpacked" if not pack and compute == "int8" else None)
    if clash:
        what = ("runs the lean graph's exact weight blocks in int8" if compute == "int8" else
                "rounds the lean graph's float32 weights and activations to int8")
        raise ExportError(f"--compute {compute} {what}; it cannot be combined with {clash}")


def _choose_graph(graph: str, config: Any, opset: int | None, dtype: str = "fp32") -> str:
    """Resolve "auto"; refuse "lean" where the lean builder does not support the model. "auto"
    keeps Optimum's graph for fp16: the lean fp16 graph's attention (GroupQueryAttention with a
    bias) needs onnxruntime-gpu >= 1.29 (runtime.providers), Optimum's runs on any CUDA build;
    `--graph lean --dtype fp16` asks for the lean one."""
    from .lean import OPSET, supports

    why = supports(config)
    if graph == "lean":
        if why:
            raise ExportError(f"--graph lean does not support this model ({why}); use --graph optimum")
        if opset is not None and opset != OPSET:
            raise ExportError(f"--graph lean writes opset {OPSET}; drop --opset or use --graph optimum")
        return "lean"
    if graph == "auto":
        return "lean" if why is None and opset in (None, OPSET) and dtype == "fp32" else "optimum"
    return graph


def _quiet_libraries() -> None:
    """Exporting prints pages of tracer warnings and hub retry notices that say nothing actionable
    to a user (the error that ends them does)."""
    import logging

    for name in ("transformers", "optimum", "torch.onnx", "onnxruntime", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:  # its "Retrying in 8s [Retry 4/5]" warnings on a flaky connection
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def _graph_io(onnx_path: Path) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    inputs = [i.name for i in m.graph.input if i.name not in init]
    outputs = [o.name for o in m.graph.output]
    shapes = {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in list(m.graph.input) + list(m.graph.output)
    }
    return inputs, outputs, shapes


def _eos_ids(config: Any, tokenizer: Any, folder: Path) -> list[int]:
    ids: list[int] = []
    gen = folder / "generation_config.json"
    sources = [getattr(config, "eos_token_id", None)]
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for s in sources:
        for t in s if isinstance(s, list) else [s]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _build_manifest(
    folder: Path, config: Any, tokenizer: Any, source: str, dtype: str, opset: int | None, quantize: str | None,
    graph: str = "optimum",
) -> Manifest:
    inputs, outputs, shapes = _graph_io(folder / "model.onnx")
    past = [n for n in inputs if n.startswith("past_key_values.")]
    if not past:
        raise ExportError("the exported graph has no past_key_values inputs")
    kv_shape = shapes[past[0]]
    vocab = shapes.get("logits", [None])[-1]
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    chat_template = getattr(tokenizer, "chat_template", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    return Manifest(
        source=source,
        dtype=dtype,
        model_type=str(getattr(config, "model_type", "unknown")),
        input_names=inputs,
        output_names=outputs,
        num_layers=len(past) // 2,
        num_kv_heads=int(kv_shape[1]),
        head_dim=int(kv_shape[3]),
        vocab_size=int(vocab if isinstance(vocab, int) else config.vocab_size),
        eos_token_ids=_eos_ids(config, tokenizer, folder),
        max_positions=int(max_pos),
        model_sha256=sha256_file(folder / "model.onnx"),
        pad_token_id=None if pad is None else int(pad),
        bos_token_id=getattr(config, "bos_token_id", None),
        opset=opset,
        chat_template=chat_template if isinstance(chat_template, str) else None,
        quantization=quantize,
        graph=graph,
    )


def _convert_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(path))
    m16 = convert_float_to_float16(m, keep_io_types=False, disable_shape_infer=True)
    onnx.save(m16, str(path))


def _quantize_int8(path: Path) -> None:
    """Weight-only int8 (MatMulNBits): one scale per block of INT8_BLOCK weights, activations stay
    fp32 (int8 compute with per-block dynamic activation scales on CPU: accuracy level 4). Unlike
    dynamic quantization, one outlier activation cannot wreck a whole tensor's scale."""
    import logging

    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise ExportError(f"--quantize int8 needs the `export` extra ({e.name} missing): pip install 'epic-ort[export]'") from None
    tmp = path.with_name("model.int8.onnx")
    logging.disable(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=8, block_size=INT8_BLOCK, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
        quantized = quantizer.model
        onnx.save(getattr(quantized, "model", quantized), str(tmp))  # ONNXModel wrapper or a ModelProto
    finally:
        logging.disable(logging.NOTSET)
    os.replace(tmp, path)


def _quantize_int8_dynamic(path: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name("model.int8.onnx")
    logging.disable(logging.WARNING)  # its advice to pre-process applies to CNNs, not to this graph
    try:
        # uint8 weights: on an AVX2-only CPU (no VNNI) int8 weights gave logits off by ~45% of their scale (tiny
        # Llama, tests/test_export.py), most likely the u8s8 kernel's saturating int16 pair sums; uint8 tracks fp32.
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True)
    finally:
        logging.disable(logging.NOTSET)
    os.replace(tmp, path)
