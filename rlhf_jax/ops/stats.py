"""Diagnostics computed over masked entries."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.masked import masked_var


def explained_variance(pred_BT: jax.Array, target_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """`1 - Var[target - pred] / Var[target]` over the masked entries (biased variances,
    denominator sum of the mask). 1 is a perfect value function, 0 no better than a constant,
    negative worse. NaN when the target is constant, as in cleanrl / lm-human-preference-details
    (the ratio is undefined there, and a silent 0 would look like a real measurement).
    """
    var_target = masked_var(target_BT, mask_BT)
    var_residual = masked_var(jnp.asarray(target_BT) - pred_BT, mask_BT)
    return jnp.where(var_target > 0, 1.0 - var_residual / var_target, jnp.nan)
