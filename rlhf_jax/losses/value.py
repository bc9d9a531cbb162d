"""Value-function (critic) losses over response tokens: a token mean over the response mask.

The RL update passes the minibatch's global `token_count` (`losses.accumulation`), so the sum
over micro-batches is exactly the whole minibatch's loss, gradient and metrics; called alone
the count is the given batch's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.config.schema import POSITIVE
from rlhf_jax.losses.accumulation import count_or_local
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean, reduce_tokens
from rlhf_jax.types import LossOut


def _inputs(outputs: Arrays, batch: Arrays) -> tuple[jax.Array, ...]:
    """[B, T] mask, values, old values, returns; padded positions zeroed (garbage-proof)."""
    mask_BT = jnp.asarray(batch["response_mask"], jnp.float32)
    real_BT = mask_BT != 0

    def clean(x):
        return jnp.where(real_BT, jnp.asarray(x, jnp.float32), 0.0)

    return mask_BT, clean(outputs["values"]), clean(batch["old_values"]), clean(batch["returns"])


READS = ("old_values", "returns", "response_mask", "token_count")


def _token_mean(x_BT: jax.Array, mask_BT: jax.Array, batch: Arrays) -> jax.Array:
    return reduce_tokens(x_BT, mask_BT, "token_mean", batch.get("token_count"))


def _metric_mean(x_BT: jax.Array, mask_BT: jax.Array, batch: Arrays) -> jax.Array:
    """A token mean over the whole minibatch, for metrics."""
    return masked_mean(x_BT, mask_BT, count=count_or_local(batch, "token_count", jnp.sum(mask_BT)))


@register_loss("value", "default", reads=READS, ranges={"clip_range": POSITIVE})
@register_loss("value", "clipped_value", reads=READS, ranges={"clip_range": POSITIVE})
def clipped_value(outputs: Arrays, batch: Arrays, clip_range: float = 0.2) -> LossOut:
    """Clipped value loss (PPO2 baselines; lm-human-preference-details):

    `L = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)`

    mean over response tokens (denominator: sum of response_mask).
    outputs: values [B, T]. batch: old_values, returns, response_mask [B, T].
    """
    mask_BT, values_BT, old_BT, returns_BT = _inputs(outputs, batch)
    clipped_values_BT = old_BT + jnp.clip(values_BT - old_BT, -clip_range, clip_range)
    unclipped_sq_BT = jnp.square(values_BT - returns_BT)
    clipped_sq_BT = jnp.square(clipped_values_BT - returns_BT)
    loss = 0.5 * _token_mean(jnp.maximum(unclipped_sq_BT, clipped_sq_BT), mask_BT, batch)
    metrics = {
        "ppo/value/loss": loss,
        "ppo/value/clipfrac": _metric_mean(clipped_sq_BT > unclipped_sq_BT, mask_BT, batch),
        "ppo/value/mean": _metric_mean(values_BT, mask_BT, batch),
    }
    return LossOut(loss, metrics)


@register_loss("value", "unclipped_value", reads=READS)
def unclipped_value(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = 0.5 * mean_t (V_t - R_t)^2` over response tokens: plain regression to the returns
    (the N-details study and later work find value clipping often unnecessary)."""
    mask_BT, values_BT, _, returns_BT = _inputs(outputs, batch)
    loss = 0.5 * _token_mean(jnp.square(values_BT - returns_BT), mask_BT, batch)
    metrics = {
        "ppo/value/loss": loss,
        "ppo/value/mean": _metric_mean(values_BT, mask_BT, batch),
    }
    return LossOut(loss, metrics)
