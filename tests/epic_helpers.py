"""Comparing two token choosers step by step along one trajectory (teacher forced).

Two choosers that compute the same thing in differently shaped model calls (token trees vs forked
rows, running ahead or not) agree up to float rounding: a rollout draw whose uniform lies within
rounding of a CDF boundary can fall the other way and change a candidate's Ĥ, and with it, rarely,
the sample. Whole generations then part for good at the first such step, so comparing them token
for token holds only by the luck of the seed. Here both choosers decide every step from the same
state, the first one's token is taken, and what is compared is how often they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from epic_ort.chooser import Row
from epic_ort.sampling.sample import sample_rng


@dataclass
class Agreement:
    steps: int
    same: int
    calls_a: int  # forward passes the rows took part in, summed over steps
    calls_b: int
    evals_a: int
    evals_b: int

    @property
    def agreement(self) -> float:
        return self.same / max(self.steps, 1)


def step_agreement(model, chooser_a, chooser_b, prompts: Sequence[str], config, num_samples: int = 1,
                   model_b=None) -> Agreement:
    """Decode every (prompt, sample) alone (batch 1) for config.max_new_tokens steps along chooser_a's
    tokens; at each step chooser_b decides from the same logits and random stream, on a copy of the
    cache with the room its own generation would have (on `model_b`, the same graph loaded again,
    where given)."""
    model_b = model_b or model
    report = Agreement(0, 0, 0, 0, 0, 0)
    procs = config.processors()
    eos = set(model.eos_token_ids)
    for p, prompt in enumerate(prompts):
        ids = model.encode(prompt)
        for s in range(num_samples):
            rows = {k: Row(p, s, list(ids), sample_rng(config.seed, p, s)) for k in "ab"}
            logits, cache = model.prefill([ids], room=config.max_new_tokens + chooser_a.scratch_positions)
            for step in range(config.max_new_tokens):
                history = np.array([rows["a"].generated], dtype=np.int64)
                scores = procs.apply(logits, history)
                # b first, on a copy of the cache: a's answer then continues from the cache itself
                room_b = config.max_new_tokens - step + chooser_b.scratch_positions
                res_b = chooser_b.choose(model_b, [rows["b"]], logits, scores, cache.select([0], room=room_b))
                res_a = chooser_a.choose(model, [rows["a"]], logits, scores, cache)
                tok = int(res_a.tokens[0])
                report.steps += 1
                report.same += int(tok == int(res_b.tokens[0]))
                for key, res in (("a", res_a), ("b", res_b)):
                    st = (res.row_stats or [{}])[0]
                    setattr(report, f"calls_{key}", getattr(report, f"calls_{key}") + st.get("forward_passes", 0))
                    setattr(report, f"evals_{key}", getattr(report, f"evals_{key}") + st.get("entropy_evals", 0))
                    rows[key].generated.append(tok)
                if tok in eos:
                    break
                logits, cache = res_a.next_logits, res_a.next_cache
    return report
