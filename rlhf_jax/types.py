"""Pytrees that flow between stages.

Shape-suffix legend for array names used across the package (`logp_BT`, `logits_BTV`, ...):
  B  batch (prompts, sequences or episodes)
  T  time (token positions)
  V  vocabulary
  K  completions per prompt (reward-model rankings)
Masks are float arrays: 1 marks a real entry, 0 padding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class LossOut(NamedTuple):
    """What every registered loss returns.

    `loss` is the scalar to differentiate; `metrics` is a flat dict of scalars with slash names
    (`ppo/policy/clipfrac`, `rm/accuracy`) that the loops log as they are.
    """

    loss: jax.Array  # scalar
    metrics: dict[str, jax.Array]  # flat scalars with slash names
