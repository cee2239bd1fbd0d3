"""Teacher-forced scoring: what the base model thinks of a given continuation, position by position.

One forward over prompt + continuation[:-1] gives the model's next-token distribution q at every
continuation position at once, exactly what step-by-step decoding would have seen (position ids and
attention mask follow `CausalLM.forward`'s left-padding rules, as in `prefill`). From q come the
surprisal −log q(token) of each token and the entropy H(q) before it: the raw material of the
entropy-calibration error (evaluation) and of closed-loop calibration.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .runtime.model import CausalLM, left_pad

# Teacher-forced logits are [rows, T, V] float32; keep one forward's logits under this many bytes
# (a 49k vocabulary at 256 positions is ~50 MB a row).
LOGITS_BUDGET_BYTES = 512 * 1024 * 1024


def score_continuations(
    model: CausalLM,
    prompt_ids: Sequence[Sequence[int]],
    continuation_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (prompt, continuation) row: (entropies, log-losses), both float64 [len(continuation)].

    entropies[t] = H(q(.|prompt, cont[:t])) in nats and log_losses[t] = -log q(cont[t]|prompt, cont[:t]),
    for t = 0..len-1, where q is the base model's distribution (raw logits, no processors).

    Why teacher forcing: one forward over prompt + cont[:-1] gives the model's prediction at every
    continuation position at once, exactly what step-by-step decoding would have seen (position
    ids and attention mask follow `CausalLM.forward`'s left-padding rules, as in `prefill`), so
    human text and samples are scored by the same pass. Rows are left-padded and run `batch_size`
    at a time (fewer when the [rows, T, V] logits would exceed LOGITS_BUDGET_BYTES).
    """
    if len(prompt_ids) != len(continuation_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuation_ids)} continuations")
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(prompt_ids)
    rows = []
    for i, (p, c) in enumerate(zip(prompt_ids, continuation_ids)):
        p, c = [int(x) for x in p], [int(x) for x in c]
        if not p:
            raise ValueError(f"row {i}: empty prompt (the first continuation token needs a context)")
        if c:
            rows.append((i, p, c))
    if not rows:
        return out
    width = max(len(p) + len(c) - 1 for _, p, c in rows)
    # only the continuation positions reach the lm_head (graphs that take logits_index; others compute all)
    scored_positions = max(len(c) for _, _, c in rows) if model.spec.logits_index else width
    per_forward = max(1, min(int(batch_size), LOGITS_BUDGET_BYTES // max(1, scored_positions * int(model.vocab_size) * 4)))
    pad = model.manifest.pad_token_id or 0
    for start in range(0, len(rows), per_forward):
        chunk = rows[start : start + per_forward]
        ids, mask = left_pad([p + c[:-1] for _, p, c in chunk], pad_id=pad)
        w = ids.shape[1]
        # row j's last real token sits at column w-1; its first continuation prediction is made at
        # the prompt's last token, len(c) - 1 columns earlier
        at_rows = np.concatenate([np.full(len(c), j) for j, (_, _, c) in enumerate(chunk)])
        at_cols = np.concatenate([np.arange(w - len(c), w) for _, _, c in chunk])
        logits, _ = model.forward(ids, model.empty_cache(len(chunk)), mask, logits_at=(at_rows, at_cols))
        at = 0
        for i, _, c in chunk:
            out[i] = entropy_and_nll(logits[at:at + len(c)], np.asarray(c, dtype=np.int64))
            at += len(c)
    return out


def entropy_and_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, −log q(target)) per row of logits [n, V], float64, from one float32 exp pass: with s = x − max,
    e = exp(s) and Z = Σ e (summed in float64), H = log Z − Σ e·s / Z and −log q(t) = log Z − s[t].
    A judge with a 262k vocabulary scores ~100k positions per evaluation row; float64 log-softmax
    copies made its NumPy work cost twice its forward passes. Accurate to ~1e-6 nats."""
    x = np.asarray(logits, dtype=np.float32)
    s = x - x.max(axis=-1, keepdims=True)
    e = np.exp(s)
    z = e.sum(axis=-1, dtype=np.float64)
    es = np.multiply(e, s, out=e, where=e > 0)  # exp(-inf) = 0 terms contribute 0, not NaN
    log_z = np.log(z)
    h = log_z - es.sum(axis=-1, dtype=np.float64) / z
    nll = log_z - s[np.arange(len(s)), targets].astype(np.float64)
    return np.maximum(h, 0.0), nll


def entropy_and_logloss(
    model: CausalLM, prompt_ids: Sequence[int], continuation_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """One row of `score_continuations`: (entropies, log-losses) along `continuation_ids`."""
    return score_continuations(model, [prompt_ids], [continuation_ids])[0]


def entropy_along(model: CausalLM, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> np.ndarray:
    """Entropy (nats) of the base model's next-token distribution at each continuation position:
    H(q(.|prompt, cont[:t])) for t = 0..len-1 (see `score_continuations`). The mean of this along
    a text is its entropy rate under the model, the quantity EPIC aligns with human text."""
    return entropy_and_logloss(model, prompt_ids, continuation_ids)[0]


def pooled_mean(per_sample: Sequence[np.ndarray]) -> float:
    """Mean over all positions of all samples (NaN when there are none): a per-token rate, so a
    sample that stopped early at EOS simply contributes fewer positions."""
    total = sum(len(a) for a in per_sample)
    return float(sum(float(np.sum(a)) for a in per_sample) / total) if total else float("nan")
