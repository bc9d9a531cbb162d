"""Building blocks of the built-in policy and preference losses, public so that a fork's own
loss uses the library's exact pieces instead of rewriting them (see docs/algorithms.md,
"Adding a part in a fork").

Policy losses (notation of `losses/policy.py`: r_t = pi(y_t) / pi_old(y_t), [B, T] over the
response):
  `policy_inputs`      the response mask, the log importance ratio and the advantages, with
                       padded positions set to 0 before any exp (junk there never leaks);
  `clip_range`         `(1 - eps_low, 1 + eps_high)` from a symmetric default;
  `clipped_surrogate`  PPO's per-token `max(-A r, -A clip(r, lo, hi))` and where it clipped;
  `policy_metrics`     the metrics every built-in policy loss logs (`ppo/policy/loss`,
                       `clipfrac`, `approxkl`, `entropy`).
Preference losses over K ranked completions per prompt ([B, K], `losses/preference.py`):
  `ranked_pairs`       better[b, i, j] = 1 when completion i is ranked above j, both real
                       (defined with the counts, in `losses.accumulation`);
  `pairwise`           x[b, i] - x[b, j] as [B, K, K];
  `preference_log_ratios`  log pi - log pi_ref per completion, 0 on padded slots;
  `reduce_pairs`       the mean over each prompt's pairs then prompts, or over every pair,
                       normalised by the whole batch's counts;
  `preference_metrics` TRL's DPO metrics (`dpo/accuracy`, the one the stage reads back, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses.accumulation import count_or_local, ranked_pairs
from rlhf_jax.ops import masked_mean

__all__ = [
    "clip_range",
    "clipped_surrogate",
    "pairwise",
    "policy_inputs",
    "policy_metrics",
    "preference_log_ratios",
    "preference_metrics",
    "ranked_pairs",
    "reduce_pairs",
]

Arrays = Mapping[str, jax.Array]
Weighting = Literal["prompt", "pair"]


def policy_inputs(outputs: Arrays, batch: Arrays) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(mask_BT, log_ratio_BT, adv_BT)` of a policy loss's inputs (`outputs["logprobs"]`,
    `batch["old_logprobs"]`, `batch["advantages"]`, `batch["response_mask"]`), sanitised:
    padded positions get log-ratio 0 and advantage 0 before any exp, so garbage there (a huge
    or NaN log-prob) reaches neither the loss nor its gradient. The importance ratio is
    `jnp.exp(log_ratio_BT)`."""
    mask_BT = jnp.asarray(batch["response_mask"], jnp.float32)
    real_BT = mask_BT != 0
    logp_BT = jnp.asarray(outputs["logprobs"], jnp.float32)
    old_BT = jnp.asarray(batch["old_logprobs"], jnp.float32)
    log_ratio_BT = jnp.where(real_BT, logp_BT - old_BT, 0.0)
    adv_BT = jnp.where(real_BT, jnp.asarray(batch["advantages"], jnp.float32), 0.0)
    return mask_BT, log_ratio_BT, adv_BT


def clip_range(clip_eps: float, low: float | None, high: float | None) -> tuple[float, float]:
    """`(1 - eps_low, 1 + eps_high)`; each side defaults to the symmetric clip_eps."""
    return 1.0 - (clip_eps if low is None else low), 1.0 + (clip_eps if high is None else high)


def clipped_surrogate(
    ratio_BT: jax.Array, adv_BT: jax.Array, lo: float, hi: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token `max(-A r, -A clip(r, lo, hi))` (PPO, Schulman et al. 2017, eq. 7, as a loss)
    and where the clipped term is the larger (what `clipfrac` counts)."""
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, lo, hi)
    return jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def policy_metrics(
    loss: jax.Array,
    outputs: Arrays,
    batch: Arrays,
    mask_BT: jax.Array,
    log_ratio_BT: jax.Array,
    clipped_on_BT: jax.Array,
) -> dict[str, jax.Array]:
    """The metrics of the built-in policy losses: `ppo/policy/loss`, `ppo/policy/clipfrac`
    (the fraction of real tokens where `clipped_on_BT`), `ppo/policy/approxkl` and, when the
    outputs hold it, `ppo/policy/entropy`. Token means over the whole minibatch
    (`batch["token_count"]`, `losses.accumulation`), whatever the loss's reduction, so they
    are exact under gradient accumulation."""
    n = count_or_local(batch, "token_count", jnp.sum(mask_BT))
    metrics = {
        "ppo/policy/loss": loss,
        "ppo/policy/clipfrac": masked_mean(clipped_on_BT, mask_BT, count=n),
        # 0.5 E[(log pi - log pi_old)^2], the k2 estimator (lm-human-preference-details' approxkl).
        "ppo/policy/approxkl": 0.5 * masked_mean(jnp.square(log_ratio_BT), mask_BT, count=n),
    }
    if "entropy" in outputs:
        metrics["ppo/policy/entropy"] = masked_mean(outputs["entropy"], mask_BT, count=n)
    return metrics


def pairwise(x_BK: jax.Array) -> jax.Array:
    """x[b, i] - x[b, j] as [B, K, K]."""
    return x_BK[:, :, None] - x_BK[:, None, :]


def preference_log_ratios(outputs: Arrays, batch: Arrays) -> jax.Array:
    """`log pi - log pi_ref` [B, K] of each completion (`outputs["logps"]`,
    `batch["ref_logps"]`), 0 on padded slots (so junk there cannot leak in)."""
    real_BK = jnp.asarray(batch["completion_mask"]) != 0
    logps = jnp.asarray(outputs["logps"], jnp.float32)
    ref = jnp.asarray(batch["ref_logps"], jnp.float32)
    return jnp.where(real_BK, logps - ref, 0.0)


def reduce_pairs(
    per_pair_BKK: jax.Array, better_BKK: jax.Array, weighting: Weighting, batch: Arrays
) -> jax.Array:
    """'prompt': the mean over each prompt's pairs, then over the prompts of the whole batch
    that have any (`batch["prompt_count"]`: each prompt weighs the same, InstructGPT's
    treatment of rankings); 'pair': the mean over every pair of the whole batch
    (`batch["pair_count"]`: prompts with more completions weigh more). Without those counts
    (a loss called alone) the batch at hand is the whole batch."""
    if weighting == "pair":
        n_pairs = count_or_local(batch, "pair_count", jnp.sum(better_BKK))
        return masked_mean(per_pair_BKK, better_BKK, count=n_pairs)
    if weighting != "prompt":
        raise RlhfJaxError(
            f"preference loss: weighting must be 'prompt' or 'pair', not {weighting!r}"
        )
    per_prompt_B = masked_mean(per_pair_BKK, better_BKK, axis=(1, 2))
    has_pairs_B = (jnp.sum(better_BKK, axis=(1, 2)) > 0).astype(jnp.float32)
    n_prompts = count_or_local(batch, "prompt_count", jnp.sum(has_pairs_B))
    return masked_mean(per_prompt_B, has_pairs_B, count=n_prompts)


def preference_metrics(
    loss: jax.Array, outputs: Arrays, batch: Arrays, better_BKK: jax.Array, rewards_BK: jax.Array
) -> dict[str, jax.Array]:
    """TRL's DPO metrics over every pair of the whole batch (`batch["pair_count"]`), from the
    implicit rewards `rewards_BK` (`beta * log-ratio`): for K = 2 "chosen" and "rejected" are
    the pair's two completions; for K > 2 the winner and loser side of every pair.
    `dpo/accuracy` is the metric the stage reads back after training
    (contract.REQUIRED_METRICS)."""
    logps_BK = jnp.where(jnp.asarray(batch["completion_mask"]) != 0, outputs["logps"], 0.0)
    pairs = count_or_local(batch, "pair_count", jnp.sum(better_BKK))

    def winner_mean(x_BK):
        return jnp.sum(better_BKK * x_BK[:, :, None]) / jnp.maximum(pairs, 1.0)

    def loser_mean(x_BK):
        return jnp.sum(better_BKK * x_BK[:, None, :]) / jnp.maximum(pairs, 1.0)

    margin_BKK = pairwise(rewards_BK)
    return {
        "dpo/loss": loss,
        "dpo/accuracy": masked_mean(margin_BKK > 0, better_BKK, count=pairs),
        "dpo/margin": masked_mean(margin_BKK, better_BKK, count=pairs),
        "dpo/rewards_chosen": winner_mean(rewards_BK),
        "dpo/rewards_rejected": loser_mean(rewards_BK),
        "dpo/logps_chosen": winner_mean(logps_BK),
        "dpo/logps_rejected": loser_mean(logps_BK),
        "dpo/pairs": jnp.sum(better_BKK),  # this micro-batch's share: the shares add up
    }
