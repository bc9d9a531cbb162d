"""Statistics over groups of samples: the G responses drawn for one prompt share a group id.

Group ids are integers in [0, B) (any labelling; samples of a group need not be adjacent), so
the statistics are segment reductions with B segments: static shapes, no sorting, and the same
code for G = 1 (every group a singleton) as for ragged groups a fork may build.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _segments(x_B: jax.Array, group_ids_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_B = jnp.asarray(x_B, jnp.promote_types(jnp.result_type(x_B), jnp.float32))
    ids_B = jnp.asarray(group_ids_B, jnp.int32)
    return x_B, ids_B


def group_size(group_ids_B: jax.Array) -> jax.Array:
    """[B]: how many samples share each sample's group (itself included)."""
    ids_B = jnp.asarray(group_ids_B, jnp.int32)
    b = ids_B.shape[0]
    counts = jax.ops.segment_sum(jnp.ones((b,), jnp.float32), ids_B, num_segments=b)
    return counts[ids_B]


def group_mean(x_B: jax.Array, group_ids_B: jax.Array) -> jax.Array:
    """[B]: the mean of x over each sample's group, `sum_{j in g} x_j / |g|`.

    Summed as deviations from the group's maximum, so a group of equal values has exactly that
    value as its mean (and a baseline subtracted from them gives exactly 0, not rounding).
    """
    x_B, ids_B = _segments(x_B, group_ids_B)
    b = x_B.shape[0]
    hi_B = jax.ops.segment_max(x_B, ids_B, num_segments=b)[ids_B]
    sums = jax.ops.segment_sum(x_B - hi_B, ids_B, num_segments=b)
    return hi_B + sums[ids_B] / group_size(ids_B)


def group_std(x_B: jax.Array, group_ids_B: jax.Array, unbiased: bool = True) -> jax.Array:
    """[B]: the standard deviation of x over each sample's group.

    Unbiased (denominator |g| - 1, as `torch.std` in the GRPO implementations of TRL and verl)
    by default; 0 for a singleton group, where it is undefined.
    """
    x_B, ids_B = _segments(x_B, group_ids_B)
    b = x_B.shape[0]
    n_B = group_size(ids_B)
    dev_B = x_B - group_mean(x_B, ids_B)
    sq = jax.ops.segment_sum(jnp.square(dev_B), ids_B, num_segments=b)[ids_B]
    denom_B = n_B - 1.0 if unbiased else n_B
    return jnp.where(denom_B > 0, jnp.sqrt(sq / jnp.maximum(denom_B, 1.0)), 0.0)


def leave_one_out_mean(x_B: jax.Array, group_ids_B: jax.Array) -> jax.Array:
    """[B]: the mean of x over the *other* samples of each group, `sum_{j != i} x_j / (|g| - 1)`
    (RLOO's baseline); x_i itself for a singleton group, so that x_i minus it is 0."""
    x_B, ids_B = _segments(x_B, group_ids_B)
    n_B = group_size(ids_B)
    # (sum - x_i) / (n - 1) = x_i - n / (n - 1) * (x_i - mean): exact for equal values.
    dev_B = (x_B - group_mean(x_B, ids_B)) * n_B / jnp.maximum(n_B - 1.0, 1.0)
    return jnp.where(n_B > 1, x_B - dev_B, x_B)


def groups_all_equal(x_B: jax.Array, group_ids_B: jax.Array) -> jax.Array:
    """[B] bool: every sample of the group has the same x (no learning signal for group
    baselines; DAPO's dynamic sampling drops such groups). True for singleton groups."""
    x_B, ids_B = _segments(x_B, group_ids_B)
    b = x_B.shape[0]
    hi = jax.ops.segment_max(x_B, ids_B, num_segments=b)[ids_B]
    lo = jax.ops.segment_min(x_B, ids_B, num_segments=b)[ids_B]
    return hi == lo
