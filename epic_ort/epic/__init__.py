"""EPIC: exact entropy-aligned sampling with lazy Gumbel-max over batched lookahead rollouts."""

from .lazy import LazySearch, eager_gumbel_max, lazy_gumbel_max
from .lookahead import lookahead_entropy
from .sampler import EpicChooser, epic_step

__all__ = ["EpicChooser", "LazySearch", "eager_gumbel_max", "epic_step", "lazy_gumbel_max", "lookahead_entropy"]
