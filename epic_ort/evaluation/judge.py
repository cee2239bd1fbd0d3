"""An independent judge: a second exported model scores every method's text and the human's, so that
"lower entropy" cannot pass for "better": text that the base model finds predictable because it
repeats itself or drifts into blandness is not thereby what another model finds likely.

The judge has its own tokenizer, so text goes through it as text: the passage's prompt, encoded with
the judge's special tokens, then the continuation, encoded without them; the judge's log loss is taken
over the continuation's tokens only. Human and generated continuations are treated alike.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..runtime.model import CausalLM
from ..scoring import score_continuations


class Judge:
    def __init__(self, model: CausalLM, batch_size: int = 8):
        self.model = model
        self.batch_size = batch_size

    @property
    def identity(self) -> dict[str, str]:
        return {"dir": str(self.model.model_dir), "sha256": self.model.manifest.model_sha256}

    def log_losses(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """The judge's −log p of each continuation's tokens given its prompt (empty arrays for empty text)."""
        prompt_ids = [self.model.encode(p) or self.model.encode(" ") for p in prompts]
        cont_ids = [self.model.encode(c, add_special_tokens=False) for c in continuations]
        return [nll for _, nll in score_continuations(self.model, prompt_ids, cont_ids, self.batch_size)]
