"""EPIC: exact entropy-aligned sampling with lazy Gumbel-max over batched lookahead rollouts.

lazy.py: the exact search. estimator.py: Ĥ for many candidates at once, laid out as token trees
(tree.py) or forked rows (forked.py). chooser.py: the token chooser the decode loop drives.
policies.py: the search heuristics (first block, rollout pruning). run_ahead.py: the optional policy
that runs the next step's first depths inside this step's calls.
"""

from .chooser import EpicChooser, epic_step
from .estimator import lookahead_entropy
from .lazy import LazySearch, eager_gumbel_max, lazy_gumbel_max

__all__ = ["EpicChooser", "LazySearch", "eager_gumbel_max", "epic_step", "lazy_gumbel_max", "lookahead_entropy"]
