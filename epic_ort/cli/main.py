"""`epic-ort` commands. Errors a user can fix become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import EpicOrtError
from ..export.sources import alias_names
from .evaluate import calibrate, evaluate
from .generate import generate
from .serve import serve

class _Group(click.Group):
    """Turns EpicOrtError into `epic-ort: error: ...` (exit 2) and Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EpicOrtError as e:
            click.echo(f"epic-ort: error: {e}", err=True)
            ctx.exit(2)
        except FileExistsError as e:
            click.echo(f"epic-ort: error: {e} already exists; pass --force to replace it", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("epic-ort: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            ctx.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="epic-ort")
def main() -> None:
    """Entropy-aligned decoding (EPIC) on ONNX Runtime."""


# -- export --------------------------------------------------------------------------------


@main.command(help=f"""Export MODEL to OUTPUT_DIR, an epic-ort model folder.

    MODEL is a local Hugging Face folder, a known alias ({', '.join(alias_names())}), or a hub id where the
    network allows.""")
@click.argument("model")
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--opset", type=click.IntRange(11, 23), default=None, help="Opset of an Optimum graph (its default if unset); the lean graph is opset 23.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--quantize", type=click.Choice(["int8", "int8-dynamic"]), default=None,
              help="int8: weight-only int8 MatMuls (CPU, ~+1% perplexity); int8-dynamic: ORT dynamic quantization.")
@click.option("--graph", type=click.Choice(["auto", "lean", "optimum"]), default="auto", show_default=True,
              help="lean: epic-ort's own graph for Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma (fewer ops, faster; CPU, "
                   "or CUDA with --dtype fp16 and onnxruntime-gpu >= 1.29); auto: lean where the model supports it, "
                   "Optimum's graph otherwise and for fp16.")
@click.option("--unpacked", is_flag=True,
              help="Lean graph: store every weight as float32, even those that are exactly 4-bit blocks (a Q4_1 GGUF's), which "
                   "the lean graph otherwise keeps as 4-bit. Same numbers; 2.7x the file and more memory, slower at batch 1, "
                   "a little faster for batched EPIC.")
@click.option("--compute", type=click.Choice(["fp32", "int8", "int8-gemm"]), default="fp32", show_default=True,
              help="Lean graph: int8 multiplies the exact 4-bit blocks (and a Q8_0 lm_head as 8-bit blocks) with int8 dot "
                   "products, activations quantized per block of 32: faster on the CPU, not bit-faithful to float32. "
                   "int8-gemm runs every product as int8 GEMM (weights per column, activations per token): faster for "
                   "EPIC's token trees, batches and prefill.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
def export(model: str, output_dir: Path, opset: int | None, dtype: str, quantize: str | None, graph: str,
           unpacked: bool, compute: str, force: bool) -> None:
    from ..export import export as run_export

    manifest = run_export(model, output_dir, opset=opset, dtype=dtype, force=force, quantize=quantize, graph=graph,
                          pack=not unpacked, compute=compute)
    click.echo(
        f"exported {manifest.source} -> {output_dir} ({manifest.graph} graph, {manifest.num_layers} layers, "
        f"vocab {manifest.vocab_size}, "
        f"{manifest.dtype}{', ' + manifest.quantization if manifest.quantization else ''}"
        f"{_packed_note(manifest.extra.get('packed_products'))}"
        f"{', ' + manifest.extra['compute'] + ' compute' if manifest.extra.get('compute') else ''})"
    )


def _packed_note(count: int | None) -> str:
    return f", {count} products kept as their exact blocks" if count else ""


# -- generate ------------------------------------------------------------------------------

main.add_command(generate)
main.add_command(serve)


# -- calibrate, evaluate ------------------------------------------------------------------

main.add_command(calibrate)
main.add_command(evaluate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
