"""`epic-ort calibrate` and `epic-ort evaluate`: fitting EPIC's alpha on real text, and judging every
sampler against human text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..evaluation.methods import DEFAULT_METHODS
from .options import PROVIDER


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file(s) of real prose (repeatable); default: the corpus shipped with epic-ort.")
@click.option("--target", type=click.Choice(["entce", "lookahead"]), default="entce", show_default=True,
              help="entce: the model's own generations as surprising as human text (closed loop; also fits the "
                   "temperature baseline); lookahead: the one-step lookahead entropy at real-text contexts.")
@click.option("--horizon", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--rollouts", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--contexts", type=click.IntRange(min=2), default=None,
              help="Calibration passages generated from [default: 32 for entce, 128 for lookahead].")
@click.option("--context-tokens", type=click.IntRange(min=1), default=None, help="Prefix length [default: 128].")
@click.option("--new-tokens", type=click.IntRange(min=2), default=None,
              help="entce: tokens generated per passage and pass [default: 64].")
@click.option("--passes", type=click.IntRange(min=1), default=None, help="entce: passes over the passages [default: 2].")
@click.option("--target-contexts", type=click.IntRange(min=2), default=None,
              help="entce: passages whose human continuations set the target log loss [default: 32, never fewer than --contexts].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
def calibrate(model_dir: Path, corpus: tuple[Path, ...], target: str, horizon: int, rollouts: int,
              contexts: int | None, context_tokens: int | None, new_tokens: int | None, passes: int | None,
              target_contexts: int | None, seed: int, provider: str) -> None:
    """Fit EPIC's alpha on real text; writes MODEL_DIR/epic_calibration.json."""
    from ..calibration.targets import CALIBRATION_NAME
    from ..calibration.targets import calibrate as run_calibration
    from ..runtime.model import load

    model = load(model_dir, provider=provider)
    r = run_calibration(model, list(corpus) or None, target, horizon=horizon, rollouts=rollouts, seed=seed,
                        contexts=contexts, context_tokens=context_tokens, new_tokens=new_tokens, passes=passes,
                        target_contexts=target_contexts, show_progress=True)
    click.echo(describe_calibration(r) + f"\nwrote {Path(model_dir) / CALIBRATION_NAME}")
    if r.get("alpha_clipped"):
        click.echo("warning: alpha hit the edge of its search range; the fit is not reliable", err=True)


def describe_calibration(r: dict[str, Any]) -> str:
    """The fitted alpha with what it means, and what its standard error says about it."""
    alpha, se = r["alpha"], r["alpha_se"]
    lines = [
        f"alpha = {alpha:.4f} ± {se:.4f} (standard error; target {r['target']}, {r['contexts']} passages)",
        "  alpha is EPIC's strength: 0 is plain sampling; above 0 it favours tokens after which the model is more "
        "certain, below 0 less certain.",
    ]
    if r["target"] == "entce":
        lines += [
            f"  the model's own generations at this alpha: surprisal {r['epic_last_pass_surprisal']:.3f} nats/token "
            f"against {r['human_log_loss']:.3f}, its log loss on the human continuations",
            f"  temperature baseline fitted to the same target: T = {r['temperature']:.4f} ± {r['temperature_se']:.4f}",
        ]
    else:
        lines.append(f"  lookahead entropy: text {r['data_entropy']:.3f} ± {r['data_entropy_se']:.3f} nats, "
                     f"model at alpha 0 {r['model_entropy_at_alpha0']:.3f}, at alpha {r['model_entropy']:.3f}")
    if se >= abs(alpha):
        lines.append("  the standard error is as large as alpha itself: on this text the model is already close to "
                     "calibrated, alpha cannot be told from 0, and EPIC changes little (more --contexts narrow it)")
    return "\n".join(lines)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out real text (repeatable); default: the corpus shipped with epic-ort.")
@click.option("--methods", default=None,
              help="Comma-separated specs, e.g. epic,epic=0.15,temperature=auto,ancestral,top-p=0.9 "
                   f"[default: {', '.join(DEFAULT_METHODS)}].")
@click.option("--prompts", type=click.IntRange(min=2), default=96, show_default=True, help="Passages.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--horizon", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--rollouts", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--judge", "judge_dir", type=click.Path(path_type=Path), default=None,
              help="A second exported model that scores every method's text and the human's (judge perplexity).")
@click.option("--judge-methods", default=None,
              help="Comma-separated methods (as --methods names them) for the judge to score, with the human text "
                   "[default: all].")
@click.option("--provider", type=PROVIDER, default="auto", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report, plot and the generations (a rerun resumes and reuses them).")
def evaluate(model_dir: Path, corpus: tuple[Path, ...], methods: str | None, prompts: int, max_new_tokens: int,
             prompt_tokens: int, horizon: int, rollouts: int, batch_size: int, seed: int, judge_dir: Path | None,
             judge_methods: str | None, provider: str, out_dir: Path) -> None:
    """Entropy calibration (EntCE), diversity and judge perplexity of EPIC and the classic samplers."""
    from ..evaluation import evaluate as run_evaluation
    from ..evaluation import format_table
    from ..runtime.model import load

    model = load(model_dir, provider=provider)
    judge = load(judge_dir, provider=provider) if judge_dir is not None else None
    report = run_evaluation(model, list(corpus) or None, methods, prompts=prompts, max_new_tokens=max_new_tokens,
                            prompt_tokens=prompt_tokens, seed=seed, out_dir=out_dir, horizon=horizon,
                            rollouts=rollouts, batch_size=batch_size, judge=judge, show_progress=True,
                            judge_methods=judge_methods.split(",") if judge_methods else None)
    click.echo(format_table(report))
    click.echo(f"wrote {out_dir}/report.json, report.md, plot.png")
