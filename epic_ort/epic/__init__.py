"""EPIC: exact entropy-aligned sampling with lazy Gumbel-max over batched lookahead rollouts."""
