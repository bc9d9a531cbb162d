"""Step 3: PPO policy losses over response tokens (token mean over the response mask)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean
from rlhf_jax.types import LossOut


def _ratio_terms(outputs: Arrays, batch: Arrays, clip_eps: float):
    """Sanitised inputs and the two PPO surrogate terms, all [B, T].

    Padded positions get log_ratio 0 and advantage 0 before the exp, so garbage there (a
    huge or NaN log-prob) can reach neither the loss nor its gradient.
    """
    mask_BT = jnp.asarray(batch["response_mask"], jnp.float32)
    real_BT = mask_BT != 0
    logp_BT = jnp.asarray(outputs["logprobs"], jnp.float32)
    old_BT = jnp.asarray(batch["old_logprobs"], jnp.float32)
    log_ratio_BT = jnp.where(real_BT, logp_BT - old_BT, 0.0)
    adv_BT = jnp.where(real_BT, jnp.asarray(batch["advantages"], jnp.float32), 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    return mask_BT, log_ratio_BT, unclipped_BT, clipped_BT


def _metrics(
    loss: jax.Array,
    outputs: Arrays,
    mask_BT: jax.Array,
    log_ratio_BT: jax.Array,
    clipped_on_BT: jax.Array,
) -> dict[str, jax.Array]:
    metrics = {
        "ppo/policy/loss": loss,
        "ppo/policy/clipfrac": masked_mean(clipped_on_BT, mask_BT),
        # 0.5 E[(log pi - log pi_old)^2], the k2 estimator (lm-human-preference-details' approxkl).
        "ppo/policy/approxkl": 0.5 * masked_mean(jnp.square(log_ratio_BT), mask_BT),
    }
    if "entropy" in outputs:
        metrics["ppo/policy/entropy"] = masked_mean(outputs["entropy"], mask_BT)
    return metrics


@register_loss("policy", "default")
@register_loss("policy", "ppo_clip")
def ppo_clip(outputs: Arrays, batch: Arrays, clip_eps: float = 0.2) -> LossOut:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

    `L = mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))`, `r_t = exp(log pi - log pi_old)`

    mean over response tokens (denominator: sum of response_mask).
    outputs: logprobs [B, T], optional entropy [B, T] (metric only).
    batch: old_logprobs, advantages, response_mask [B, T].
    """
    mask_BT, log_ratio_BT, unclipped_BT, clipped_BT = _ratio_terms(outputs, batch, clip_eps)
    loss = masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
    return LossOut(loss, _metrics(loss, outputs, mask_BT, log_ratio_BT, clipped_BT > unclipped_BT))


@register_loss("policy", "ppo_dual_clip")
def ppo_dual_clip(
    outputs: Arrays, batch: Arrays, clip_eps: float = 0.2, dual_clip: float = 3.0
) -> LossOut:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): for a
    negative advantage the clipped loss is also capped at `-c A` (c > 1), so a token whose ratio
    has grown very large cannot produce an unbounded update:

    `L_t = min(max(-A r, -A clip(r, 1 -+ eps)), -c A)` if A < 0, else the PPO-clip term.
    Mean over response tokens. clipfrac counts either clip being active.
    """
    mask_BT, log_ratio_BT, unclipped_BT, clipped_BT = _ratio_terms(outputs, batch, clip_eps)
    adv_BT = jnp.where(mask_BT != 0, jnp.asarray(batch["advantages"], jnp.float32), 0.0)
    ppo_BT = jnp.maximum(unclipped_BT, clipped_BT)
    capped_BT = jnp.minimum(ppo_BT, -dual_clip * adv_BT)
    per_token_BT = jnp.where(adv_BT < 0, capped_BT, ppo_BT)
    loss = masked_mean(per_token_BT, mask_BT)
    clipped_on_BT = (clipped_BT > unclipped_BT) | (per_token_BT < ppo_BT)
    return LossOut(loss, _metrics(loss, outputs, mask_BT, log_ratio_BT, clipped_on_BT))
