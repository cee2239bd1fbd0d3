"""`epic-ort` commands. Errors a user can fix become one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..errors import EpicOrtError
from ..runtime.providers import PROVIDERS

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea,"


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


@main.command()
@click.argument("model")
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--opset", type=click.IntRange(11, 23), default=None, help="Opset of an Optimum graph (its default if unset); the lean graph is opset 23.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--quantize", type=click.Choice(["int8", "int8-dynamic"]), default=None,
              help="int8: weight-only int8 MatMuls (CPU, ~+1% perplexity); int8-dynamic: ORT dynamic quantization.")
@click.option("--graph", type=click.Choice(["auto", "lean", "optimum"]), default="auto", show_default=True,
              help="lean: epic-ort's own Llama graph (fewer ops, faster; CPU only); auto: lean where the model supports it, "
                   "Optimum's graph for fp16 (GPUs).")
@click.option("--unpacked", is_flag=True,
              help="Lean graph: store every weight as float32, even those that are exactly 4-bit blocks (a Q4_1 GGUF's), which "
                   "the lean graph otherwise keeps as 4-bit: same numbers, faster at batch 1.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
def export(model: str, output_dir: Path, opset: int | None, dtype: str, quantize: str | None, graph: str,
           unpacked: bool, force: bool) -> None:
    """Export MODEL (a local HF folder, a hub id, or the alias smollm2-135m) to OUTPUT_DIR."""
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


def _parse_alpha(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    if value is None:
        return None
    if value == "auto":
        return "auto"
    try:
        a = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'auto'") from None
    if a != a or a in (float("inf"), float("-inf")):
        raise click.BadParameter("alpha must be finite")
    return a


PROVIDER = click.Choice(list(PROVIDERS))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("prompt", nargs=-1)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="One prompt a line.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--num-samples", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per prompt.")
@click.option("--seed", type=int, default=None, help="Same seed, same tokens.")
@click.option("--greedy", is_flag=True, help="Argmax decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--typical-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--alpha", callback=_parse_alpha, default=None, help="EPIC strength: a number or 'auto' (calibrated). 0 = plain.")
@click.option("--horizon", type=click.IntRange(min=1), default=4, show_default=True, help="EPIC lookahead tokens k.")
@click.option("--rollouts", type=click.IntRange(min=1), default=2, show_default=True, help="EPIC rollouts R.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); EOS always stops.")
@click.option("--truncate", type=click.Choice(["error", "left"]), default="error", show_default=True,
              help="What to do with a prompt longer than the context: refuse, or keep its end.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True)
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL requests, one a line: {\"prompt\": ..., optional settings}. Output is JSONL.")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --input: append results here (flushed per line) instead of stdout.")
@click.option("--resume", is_flag=True, help="With --input/--output: skip requests already in the output.")
@click.option("--strict", is_flag=True, help="With --input: stop at the first bad line.")
def generate(model_dir: Path, prompt: tuple[str, ...], prompt_file: Path | None, max_new_tokens: int, num_samples: int,
             seed: int | None, greedy: bool, temperature: float, top_k: int, top_p: float, min_p: float,
             typical_p: float, alpha: float | str | None, horizon: int, rollouts: int, batch_size: int,
             provider: str, chat: bool, stop: tuple[str, ...], truncate: str, fmt: str, input_file: Path | None,
             output_file: Path | None, resume: bool, strict: bool) -> None:
    """Generate text from MODEL_DIR (an `epic-ort export` folder)."""
    from .. import decoding as gen
    from ..runtime.model import load

    if not greedy and temperature <= 0:
        raise click.BadParameter("must be > 0 (or pass --greedy)", param_hint="--temperature")
    if input_file is None and (output_file or resume or strict):
        raise click.UsageError("--output, --resume and --strict go with --input")
    if resume and output_file is None:
        raise click.UsageError("--resume needs --output FILE")
    if input_file is not None and (prompt or prompt_file):
        raise click.UsageError("give prompts either as arguments/--prompt-file or as --input JSONL, not both")
    prompts = list(prompt)
    if prompt_file is not None:
        prompts += [line.rstrip("\n") for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            from ..errors import InvalidRequestError

            raise InvalidRequestError(f"{prompt_file} has no prompts (only blank lines); write one prompt a line")
    if not prompts:
        prompts = [DEFAULT_PROMPT]
    model = load(model_dir, provider=provider)
    a = 0.0 if alpha is None else alpha
    if a == "auto":
        from ..calibration.store import resolve_auto_alpha

        a = resolve_auto_alpha(model, horizon=horizon, rollouts=rollouts)
    config = gen.GenerationConfig(
        max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, typical_p=typical_p, stop=tuple(stop), seed=seed, alpha=float(a), horizon=horizon,
        rollouts=rollouts, truncate=truncate,
    )
    if input_file is not None:
        failed = _run_requests(model, input_file, output_file, config, num_samples, batch_size, chat, resume, strict)
        if failed:
            click.echo(f"epic-ort: {failed} request(s) failed (see above)", err=True)
            sys.exit(2 if strict else 1)
        return
    stream = fmt == "text" and len(prompts) == 1 and num_samples == 1
    out = sys.stdout

    def on_token(row: Any, piece: str) -> None:
        out.write(piece)
        out.flush()

    samples = gen.generate(model, prompts, config, num_samples=num_samples, batch_size=batch_size, chat=chat,
                           on_token=on_token if stream else None)
    for s in samples:
        if fmt == "jsonl":
            out.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
        elif stream:
            out.write("\n")
        else:
            out.write(f"=== prompt {s.prompt_index} sample {s.sample_index} ({s.finish_reason}) ===\n{s.text}\n")
        out.flush()


def _run_requests(model: Any, input_file: Path, output_file: Path | None, defaults: Any, num_samples: int,
                  batch_size: int, chat: bool, resume: bool, strict: bool) -> int:
    """Serve a JSONL file of requests; returns how many lines failed."""
    from .. import decoding as gen
    from ..fileio import write_text_atomic
    from ..requests import Request, completed_requests, read_requests

    done: dict[int, set[int]] = {}
    if output_file is not None:
        if resume:
            done, good = completed_requests(output_file)
            write_text_atomic(output_file, "".join(line + "\n" for line in good))  # drop a cut-off last line
        out = open(output_file, "a" if resume else "w", encoding="utf-8")
    else:
        out = sys.stdout
    failed = 0
    try:
        for req in read_requests(input_file, defaults, num_samples, chat):
            if not isinstance(req, Request):
                line, msg = req
                click.echo(f"epic-ort: {input_file}:{line}: {msg}", err=True)
                failed += 1
                if strict:
                    break
                continue
            if len(done.get(req.index, ())) >= req.num_samples:
                continue
            try:
                cfg = req.config
                if cfg.alpha == "auto":
                    from ..calibration.store import resolve_auto_alpha

                    cfg = replace(cfg, alpha=resolve_auto_alpha(model, cfg.horizon, cfg.rollouts))
                for s in gen.generate(model, [req.prompt], cfg, num_samples=req.num_samples, batch_size=batch_size,
                                      chat=req.chat):
                    if s.sample_index in done.get(req.index, ()):
                        continue
                    obj = {"request_index": req.index, **({"id": req.id} if req.id is not None else {}), **s.to_json()}
                    obj.pop("prompt_index")
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    out.flush()
            except EpicOrtError as e:
                click.echo(f"epic-ort: {input_file}:{req.line}: {e}", err=True)
                failed += 1
                if strict:
                    break
    finally:
        if out is not sys.stdout:
            out.close()
    return failed


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
    click.echo(
        f"alpha = {r['alpha']:.4f} ± {r['alpha_se']:.4f} (bootstrap SE over {r['contexts']} contexts)\n"
        f"lookahead entropy: text {r['data_entropy']:.3f} ± {r['data_entropy_se']:.3f} nats, "
        f"model at alpha 0 {r['model_entropy_at_alpha0']:.3f}, at alpha {r['model_entropy']:.3f}\n"
        f"wrote {Path(model_dir) / CALIBRATION_NAME}"
    )
    if r["alpha_clipped"]:
        click.echo("warning: alpha hit the edge of its search range; the fit is not reliable", err=True)


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
    from ..calibration.evaluate import evaluate as run_evaluation
    from ..calibration.evaluate import format_table
    from ..runtime.model import load

    model = load(model_dir, provider=provider)
    report = run_evaluation(model, list(corpus) or None, methods, prompts=prompts, max_new_tokens=max_new_tokens,
                            prompt_tokens=prompt_tokens, seed=seed, out_dir=out_dir, horizon=horizon,
                            rollouts=rollouts, batch_size=batch_size, show_progress=True)
    click.echo(format_table(report))
    click.echo(f"wrote {out_dir}/report.json, report.md, plot.png")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
