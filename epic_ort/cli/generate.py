"""`epic-ort generate`: prompts (arguments, a file, stdin) or a JSONL file of requests in, text out."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..calibration.store import resolve_alpha
from ..errors import EpicOrtError, InvalidRequestError
from ..settings import GenerationConfig
from .options import PROVIDER, config_from, generation_options


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("prompt", nargs=-1)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="One prompt a line.")
@generation_options
@click.option("--num-samples", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat template (as a user message).")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True)
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL requests, one a line: {\"prompt\": ..., optional settings}. Output is JSONL.")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path),
              help="With --input: write results here (flushed per line) instead of stdout. An existing non-empty "
                   "file is refused unless --resume (append what is missing) or --overwrite.")
@click.option("--resume", is_flag=True, help="With --input/--output: skip requests already in the output, append the rest.")
@click.option("--overwrite", is_flag=True, help="With --output: replace an existing file.")
@click.option("--strict", is_flag=True, help="With --input: stop at the first bad line.")
def generate(model_dir: Path, prompt: tuple[str, ...], prompt_file: Path | None, num_samples: int, batch_size: int,
             provider: str, chat: bool, fmt: str, input_file: Path | None, output_file: Path | None, resume: bool,
             overwrite: bool, strict: bool, **settings: Any) -> None:
    """Generate text from MODEL_DIR (an `epic-ort export` folder).

    PROMPT: one or more prompts (quote each). Without a PROMPT, --prompt-file or --input, the prompt
    is read from standard input (`echo "Once upon a time" | epic-ort generate DIR`)."""
    from ..runtime.model import load

    config = config_from(settings)
    _check_output_options(input_file, output_file, resume, overwrite, strict)
    if input_file is not None and (prompt or prompt_file):
        raise click.UsageError("give prompts either as arguments/--prompt-file or as --input JSONL, not both")
    prompts = _collect_prompts(prompt, prompt_file) if input_file is None else []
    model = load(model_dir, provider=provider)
    if input_file is not None:
        failed = _run_requests(model, input_file, output_file, config, num_samples, batch_size, chat, resume, strict)
        if failed:
            click.echo(f"epic-ort: {failed} request(s) failed (see above)", err=True)
            sys.exit(2 if strict else 1)
        return
    _write_samples(model, prompts, resolve_alpha(model, config), num_samples, batch_size, chat, fmt)


def _write_samples(model: Any, prompts: list[str], config: GenerationConfig, num_samples: int, batch_size: int,
                   chat: bool, fmt: str) -> None:
    """Text (streamed for one prompt and one sample) or JSONL, a sample as soon as it finishes."""
    from ..decoding import generate as run

    stream = fmt == "text" and len(prompts) == 1 and num_samples == 1
    out = sys.stdout

    def on_token(row: Any, piece: str) -> None:
        out.write(piece)
        out.flush()

    for s in run(model, prompts, config, num_samples=num_samples, batch_size=batch_size, chat=chat,
                 on_token=on_token if stream else None):
        if fmt == "jsonl":
            out.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
        elif stream:
            out.write("\n")
        else:
            out.write(f"=== prompt {s.prompt_index} sample {s.sample_index} ({s.finish_reason}) ===\n{s.text}\n")
        out.flush()


def _check_output_options(input_file: Path | None, output_file: Path | None, resume: bool, overwrite: bool,
                          strict: bool) -> None:
    """--output never destroys finished results unless asked to (--overwrite)."""
    if input_file is None and (output_file or resume or strict or overwrite):
        raise click.UsageError("--output, --resume, --overwrite and --strict go with --input")
    if (resume or overwrite) and output_file is None:
        raise click.UsageError("--resume and --overwrite need --output FILE")
    if resume and overwrite:
        raise click.UsageError("--resume keeps the output's results, --overwrite replaces them: pick one")
    if output_file is not None and not (resume or overwrite) and output_file.is_file() and output_file.stat().st_size:
        raise click.UsageError(f"{output_file} exists and holds results; pass --resume to add the missing ones "
                               "or --overwrite to replace it")


def _collect_prompts(prompt: tuple[str, ...], prompt_file: Path | None) -> list[str]:
    """Prompts from the arguments and --prompt-file, else all of standard input as one prompt."""
    prompts = list(prompt)
    if prompt_file is not None:
        lines = [line for line in prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise InvalidRequestError(f"{prompt_file} has no prompts (only blank lines); write one prompt a line")
        prompts += lines
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise click.UsageError("no prompt: give PROMPT, --prompt-file FILE or --input FILE, or pipe the prompt "
                                   "on standard input")
        text = sys.stdin.read()
        if not text.strip():
            raise InvalidRequestError("the prompt read from standard input is empty")
        prompts = [text[:-1] if text.endswith("\n") else text]
    for i, p in enumerate(prompt):
        if len(prompt) > 1 and len(p.strip()) <= 2 and not any(c.isalnum() for c in p):
            click.echo(f"epic-ort: warning: prompt {i} is {p!r}; if it was meant for an option, note that --stop "
                       "takes one value (repeat --stop for several)", err=True)
    return prompts


def _run_requests(model: Any, input_file: Path, output_file: Path | None, defaults: Any, num_samples: int,
                  batch_size: int, chat: bool, resume: bool, strict: bool) -> int:
    """Serve a JSONL file of requests; returns how many lines failed."""
    from ..decoding import generate as run
    from ..fileio import write_text_atomic
    from ..requests import Request, completed_requests, read_requests

    done: dict[int, set[int]] = {}
    requests = list(read_requests(input_file, defaults, num_samples, chat))
    if output_file is not None:
        if resume:
            done, good = completed_requests(output_file)
            write_text_atomic(output_file, "".join(line + "\n" for line in good))  # drop a cut-off last line
            _report_resume(requests, done)
        out = open(output_file, "a" if resume else "w", encoding="utf-8")
    else:
        out = sys.stdout
    failed = 0
    try:
        for req in requests:
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
                for s in run(model, [req.prompt], resolve_alpha(model, req.config), num_samples=req.num_samples,
                             batch_size=batch_size, chat=req.chat):
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


def _report_resume(requests: list[Any], done: dict[int, set[int]]) -> None:
    from ..requests import Request

    good = [r for r in requests if isinstance(r, Request)]
    complete = sum(1 for r in good if len(done.get(r.index, ())) >= r.num_samples)
    click.echo(f"epic-ort: resuming: {complete} of {len(good)} request(s) already complete, "
               f"{len(good) - complete} to run", err=True)
