"""Policy losses over response tokens: PPO-clip (with DAPO's asymmetric clip-higher), dual-clip,
GSPO and CISPO.

Every policy loss takes `reduction` (see `ops.reduce_tokens`): how per-token terms become one
number. The RL update passes `ppo.loss_reduction` (when set) and the minibatch's global counts
(`token_count`, `sequence_count`; `losses.accumulation`), so the sum over micro-batches of
unequal lengths is exactly the whole minibatch's loss, gradient and metrics. Called alone
(tests, a fork's notebook) the counts default to those of the given batch.

Notation: r_t = pi(y_t) / pi_old(y_t), A_t the advantage, all [B, T] over the response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.config.schema import POSITIVE, Range
from rlhf_jax.losses.blocks import clip_range, clipped_surrogate, policy_inputs, policy_metrics
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean, reduce_tokens
from rlhf_jax.types import LossOut

# What every policy loss here reads from the minibatch (counts are optional).
READS = ("old_logprobs", "advantages", "response_mask", "token_count", "sequence_count")
# The clip range [1 - eps_low, 1 + eps_high] holds 1 inside it (an eps of 0 would freeze the
# ratio's side; eps_low >= 1: no lower clip). Checked when the config is loaded.
CLIP_RANGES = {"clip_eps": POSITIVE, "clip_eps_low": POSITIVE, "clip_eps_high": POSITIVE}


def _reduce(x_BT: jax.Array, mask_BT: jax.Array, batch: Arrays, reduction: str) -> jax.Array:
    return reduce_tokens(
        x_BT, mask_BT, reduction, batch.get("token_count"), batch.get("sequence_count")
    )


@register_loss("policy", "default", reads=READS, ranges=CLIP_RANGES)
@register_loss("policy", "ppo_clip", reads=READS, ranges=CLIP_RANGES)
def ppo_clip(
    outputs: Arrays,
    batch: Arrays,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    reduction: str = "token_mean",
) -> LossOut:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

    `L_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))`, reduced by `reduction`.

    eps_low = eps_high = clip_eps by default; DAPO's clip-higher (Yu et al. 2025, arXiv
    2503.14476) raises only the upper one (clip_eps_high=0.28) so that unlikely tokens can gain
    probability. outputs: logprobs [B, T], optional entropy [B, T] (metric only).
    batch: old_logprobs, advantages, response_mask [B, T].
    """
    mask_BT, log_ratio_BT, adv_BT = policy_inputs(outputs, batch)
    lo, hi = clip_range(clip_eps, clip_eps_low, clip_eps_high)
    per_token_BT, clipped_on_BT = clipped_surrogate(jnp.exp(log_ratio_BT), adv_BT, lo, hi)
    loss = _reduce(per_token_BT, mask_BT, batch, reduction)
    return LossOut(loss, policy_metrics(loss, outputs, batch, mask_BT, log_ratio_BT, clipped_on_BT))


@register_loss(
    "policy",
    "ppo_dual_clip",
    reads=READS,
    ranges={**CLIP_RANGES, "dual_clip": Range(1, lo_open=True)},
)
def ppo_dual_clip(
    outputs: Arrays,
    batch: Arrays,
    clip_eps: float = 0.2,
    dual_clip: float = 3.0,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    reduction: str = "token_mean",
) -> LossOut:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): for a
    negative advantage the clipped loss is also capped at `-c A` (c > 1), so a token whose ratio
    has grown very large cannot produce an unbounded update:

    `L_t = min(max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), -c A)` if A < 0, else the
    PPO-clip term. clipfrac counts either clip being active.
    """
    mask_BT, log_ratio_BT, adv_BT = policy_inputs(outputs, batch)
    lo, hi = clip_range(clip_eps, clip_eps_low, clip_eps_high)
    ppo_BT, clipped_on_BT = clipped_surrogate(jnp.exp(log_ratio_BT), adv_BT, lo, hi)
    capped_BT = jnp.minimum(ppo_BT, -dual_clip * adv_BT)
    per_token_BT = jnp.where(adv_BT < 0, capped_BT, ppo_BT)
    loss = _reduce(per_token_BT, mask_BT, batch, reduction)
    clipped_on_BT = clipped_on_BT | (per_token_BT < ppo_BT)
    return LossOut(loss, policy_metrics(loss, outputs, batch, mask_BT, log_ratio_BT, clipped_on_BT))


@register_loss("policy", "gspo", reads=READS, ranges=CLIP_RANGES)
def gspo(
    outputs: Arrays,
    batch: Arrays,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float = 4e-4,
    reduction: str = "seq_mean_token_mean",
) -> LossOut:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per sequence,

    `s_i = exp(1/|y_i| sum_t log r_{i,t})`,
    `L_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_l, 1 + eps_h))`

    with the paper's tiny clip range. Written in its "GSPO-token" form, `s_{i,t} = sg[s_i] *
    pi(y_t) / sg[pi(y_t)]` (equal to s_i in value), so each token keeps its own advantage; with
    the default `seq_mean_token_mean` reduction and one advantage per sequence (GRPO, RLOO) the
    loss and its gradient are exactly the sequence-level GSPO objective.
    """
    mask_BT, log_ratio_BT, adv_BT = policy_inputs(outputs, batch)
    seq_log_ratio_B1 = masked_mean(log_ratio_BT, mask_BT, axis=1)[:, None]
    log_s_BT = jax.lax.stop_gradient(seq_log_ratio_B1) + (
        log_ratio_BT - jax.lax.stop_gradient(log_ratio_BT)
    )
    per_token_BT, clipped_on_BT = clipped_surrogate(
        jnp.exp(log_s_BT), adv_BT, 1.0 - clip_eps_low, 1.0 + clip_eps_high
    )
    loss = _reduce(per_token_BT, mask_BT, batch, reduction)
    return LossOut(loss, policy_metrics(loss, outputs, batch, mask_BT, log_ratio_BT, clipped_on_BT))


@register_loss("policy", "cispo", reads=READS, ranges=CLIP_RANGES)
def cispo(
    outputs: Arrays,
    batch: Arrays,
    clip_eps_low: float = 1.0,
    clip_eps_high: float = 0.28,
    reduction: str = "token_mean",
) -> LossOut:
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): clip the importance weight, not the update,

    `L_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * log pi(y_t)`

    so every token keeps a gradient (PPO-clip drops the tokens whose ratio left the range).
    MiniMax set no lower bound in practice (eps_low = 1: the weight is only capped above).
    Only the gradient is meaningful; the value is not a surrogate of the return.
    """
    mask_BT, log_ratio_BT, adv_BT = policy_inputs(outputs, batch)
    real_BT = mask_BT != 0
    logp_BT = jnp.where(real_BT, jnp.asarray(outputs["logprobs"], jnp.float32), 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    weight_BT = jax.lax.stop_gradient(jnp.clip(ratio_BT, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    loss = _reduce(-weight_BT * adv_BT * logp_BT, mask_BT, batch, reduction)
    clipped_on_BT = weight_BT != ratio_BT
    return LossOut(loss, policy_metrics(loss, outputs, batch, mask_BT, log_ratio_BT, clipped_on_BT))
