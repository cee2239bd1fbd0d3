"""`epic-ort` commands. Errors a user can fix become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import EpicOrtError
from ..export.exporter import alias_names
from .generate import generate
from .options import PROVIDER

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
              help="lean: epic-ort's own graph for Llama, Mistral, Qwen2/2.5, Qwen3 and Gemma (fewer ops, faster; CPU "
                   "only); auto: lean where the model supports it, Optimum's graph otherwise and for fp16 (GPUs).")
@click.option("--unpacked", is_flag=True,
              help="Lean graph: store every weight as float32, even those that are exactly 4-bit blocks (a Q4_1 GGUF's), which "
                   "the lean graph otherwise keeps as 4-bit. Same numbers; 2.7x the file and more memory, slower at batch 1, "
                   "a little faster for batched EPIC.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
def export(model: str, output_dir: Path, opset: int | None, dtype: str, quantize: str | None, graph: str,
           unpacked: bool, force: bool) -> None:
    from ..export import export as run_export

    manifest = run_export(model, output_dir, opset=opset, dtype=dtype, force=force, quantize=quantize, graph=graph,
                          pack=not unpacked)
    click.echo(
        f"exported {manifest.source} -> {output_dir} ({manifest.graph} graph, {manifest.num_layers} layers, "
        f"vocab {manifest.vocab_size}, "
        f"{manifest.dtype}{', ' + manifest.quantization if manifest.quantization else ''}"
        f"{_packed_note(manifest.extra.get('packed_products'))})"
    )


def _packed_note(count: int | None) -> str:
    return f", {count} products kept as their exact 4-bit blocks" if count else ""


# -- generate ------------------------------------------------------------------------------

main.add_command(generate)


# -- calibrate -----------------------------------------------------------------------------


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file(s) of real prose (repeatable); default: the corpus shipped with epic-ort.")
@click.option("--horizon", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--rollouts", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--contexts", type=click.IntRange(min=2), default=None, help="Random corpus positions [default: 128].")
@click.option("--context-tokens", type=click.IntRange(min=1), default=None, help="Prefix length [default: 128].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
def calibrate(model_dir: Path, corpus: tuple[Path, ...], horizon: int, rollouts: int, contexts: int | None,
              context_tokens: int | None, seed: int, provider: str) -> None:
    """Fit EPIC's alpha on real text; writes MODEL_DIR/epic_calibration.json."""
    from ..calibration.calibrate import CALIBRATION_NAME, CalibrationSettings
    from ..calibration.calibrate import calibrate as run_calibration
    from ..runtime.model import load

    model = load(model_dir, provider=provider)
    settings = CalibrationSettings(horizon=horizon, rollouts=rollouts, seed=seed)
    if contexts is not None:
        settings.contexts = contexts
    if context_tokens is not None:
        settings.context_tokens = context_tokens
    r = run_calibration(model, list(corpus) or None, settings, show_progress=True)
    click.echo(_describe_calibration(r) + f"\nwrote {Path(model_dir) / CALIBRATION_NAME}")
    if r["alpha_clipped"]:
        click.echo("warning: alpha hit the edge of its search range; the fit is not reliable", err=True)


def _describe_calibration(r: dict[str, Any]) -> str:
    """The fitted alpha with what it means, and what its standard error says about it."""
    alpha, se = r["alpha"], r["alpha_se"]
    lines = [
        f"alpha = {alpha:.4f} ± {se:.4f} (bootstrap standard error over {r['contexts']} contexts)",
        "  alpha is EPIC's strength: 0 is plain sampling; above 0 it favours tokens after which the model is more "
        "certain, below 0 less certain, until the model's lookahead entropy matches the text's.",
        f"  lookahead entropy: text {r['data_entropy']:.3f} ± {r['data_entropy_se']:.3f} nats, "
        f"model at alpha 0 {r['model_entropy_at_alpha0']:.3f}, at alpha {r['model_entropy']:.3f}",
    ]
    if se >= abs(alpha):
        lines.append("  the standard error is as large as alpha itself: on this text the model is already close to "
                     "calibrated, alpha cannot be told from 0, and EPIC changes little (more --contexts narrow it)")
    return "\n".join(lines)


# -- evaluate ------------------------------------------------------------------------------


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out real text (repeatable); default: the corpus shipped with epic-ort.")
@click.option("--methods", default=None,
              help="Comma-separated: epic, epic=0.15, ancestral, temperature=0.7, top-k=50, top-p=0.9, min-p=0.1, "
                   "typical-p=0.9, greedy [default: epic and seven baselines].")
@click.option("--prompts", type=click.IntRange(min=2), default=24, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--horizon", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--rollouts", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def evaluate(model_dir: Path, corpus: tuple[Path, ...], methods: str | None, prompts: int, max_new_tokens: int,
             prompt_tokens: int, horizon: int, rollouts: int, batch_size: int, seed: int, provider: str,
             out_dir: Path) -> None:
    """Entropy calibration of EPIC and the classic samplers against human text."""
    from ..evaluation import evaluate as run_evaluation
    from ..evaluation import format_table
    from ..runtime.model import load

    model = load(model_dir, provider=provider)
    report = run_evaluation(model, list(corpus) or None, methods, prompts=prompts, max_new_tokens=max_new_tokens,
                            prompt_tokens=prompt_tokens, seed=seed, out_dir=out_dir, horizon=horizon,
                            rollouts=rollouts, batch_size=batch_size, show_progress=True)
    click.echo(format_table(report))
    click.echo(f"wrote {out_dir}/report.json, report.md, plot.png")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
