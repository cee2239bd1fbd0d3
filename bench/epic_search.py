"""What EPIC's search costs, per generated token, for settings of its two heuristics.

EPIC's search is exact whatever `margin` (how wide the first block of candidates is) and
`prune_slack` (how early the first round stops rollouts) are: they only decide how much the model
runs. The counts (ORT calls a row takes part in, candidate and rollout tokens run) depend only on
the prompts, seeds and settings, not on the machine, so they compare settings without timing noise;
wall time per token is shown beside them.

    python bench/epic_search.py                          # a small grid around the defaults (0.5, 2.5), alpha 0.2 and 0.5
    python bench/epic_search.py --margins 0.25,0.5,1 --slacks 1.5,2,2.5 --alphas 0.2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import epic_ort  # noqa: E402
from epic_ort.decoding import GenerationConfig, generate  # noqa: E402
from epic_ort.epic.chooser import EpicChooser  # noqa: E402

# prose of the package's own data plus text of other kinds, so no setting is fitted to one style
OTHER_PROMPTS = [
    "The history of the steam engine begins in the first century, when Hero of Alexandria described a device that",
    "User reviews of the new phone were mixed. Many praised the battery life, but several complained that the camera",
    'def parse_config(path):\n    """Read the configuration file and return a dictionary."""\n    with open(path) as f:\n',
]


def prompts(model: epic_ort.CausalLM, length: int) -> list[list[int]]:
    texts = [" ".join(p.read_text(encoding="utf-8").split()) for p in sorted((ROOT / "epic_ort" / "data").glob("*.txt"))]
    return [model.encode(t)[:length] for t in texts + OTHER_PROMPTS]


def measure(model: epic_ort.CausalLM, prompt_ids: list[list[int]], alpha: float, margin: float, slack: float,
            tokens: int, batch: int) -> dict[str, float]:
    passes = run = generated = 0
    seconds = 0.0
    for i, ids in enumerate(prompt_ids):
        config = GenerationConfig(max_new_tokens=tokens, alpha=alpha, seed=100 * i)
        chooser = EpicChooser(alpha=alpha, horizon=config.horizon, rollouts=config.rollouts,
                              processors=config.processors(), margin=margin, prune_slack=slack)
        t0 = time.perf_counter()
        for s in generate(model, prompt_ids=[ids] * batch, config=config, chooser=chooser, batch_size=batch):
            passes += s.stats["forward_passes"]
            run += s.stats["lookahead_tokens"]
            generated += s.stats["tokens"]
        seconds += time.perf_counter() - t0
    return {"passes": passes / generated, "lookahead_tokens": run / generated, "ms": 1000 * seconds / generated}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "smollm2-135m"))
    ap.add_argument("--alphas", default="0.2,0.5")
    ap.add_argument("--margins", default="0.5,1.0")
    ap.add_argument("--slacks", default="2.0,2.5")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="copies of each prompt decoded together")
    args = ap.parse_args(argv)
    try:
        floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
        alphas, margins, slacks = floats(args.alphas), floats(args.margins), floats(args.slacks)
        model = epic_ort.load(args.model_dir, provider="cpu")
    except (ValueError, OSError, epic_ort.EpicOrtError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = prompts(model, args.prompt_len)
    print(f"{len(ids)} prompts of {args.prompt_len} tokens, {args.tokens} new tokens each, batch {args.batch}, "
          f"horizon 4, rollouts 2; per generated token:\n")
    print("| alpha | margin | prune_slack | forward passes | lookahead tokens | ms (wall) |")
    print("|---|---|---|---|---|---|")
    for alpha in alphas:
        for margin in margins:
            for slack in slacks:
                r = measure(model, ids, alpha, margin, slack, args.tokens, args.batch)
                print(f"| {alpha} | {margin} | {slack} | {r['passes']:.3f} | {r['lookahead_tokens']:.2f} | {r['ms']:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
