"""A loss living outside the library, as a research fork would write it.

Selected from config with `policy_loss: "custom_loss_module:my_loss"` (module on PYTHONPATH).
"""

import jax
import jax.numpy as jnp

from rlhf_jax.losses.blocks import clip_range, clipped_surrogate, policy_inputs, policy_metrics
from rlhf_jax.ops import masked_mean, next_token_logprobs, reduce_tokens
from rlhf_jax.registry import declare
from rlhf_jax.types import LossOut


def my_loss(outputs, batch, scale: float = 1.0) -> LossOut:
    """REINFORCE-style surrogate: -scale * mean_t A_t log pi(y_t)."""
    mask = batch["response_mask"]
    logp = jnp.where(mask != 0, outputs["logprobs"], 0.0)
    loss = -scale * masked_mean(batch["advantages"] * logp, mask)
    return LossOut(loss, {"custom/loss": loss})


def local_sft(outputs, batch) -> LossOut:
    """Cross-entropy averaged over the target tokens of the batch it is given: not exact when
    a step splits the batch into micro-batches (it ignores the whole batch's token_count)."""
    logp = next_token_logprobs(outputs["logits"], batch["input_ids"])
    loss = -masked_mean(logp, jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:])
    return LossOut(loss, {"sft/loss": loss})


NOT_A_FUNCTION = 3


# The worked fork example of docs/algorithms.md ("A new policy loss from the library's
# blocks"): the clip kept only where the advantage is negative, built from the public
# helpers with no code copied from losses/policy.py.


@declare(reads=("old_logprobs", "advantages", "response_mask", "token_count", "sequence_count"))
def clip_negatives_only(
    outputs, batch, clip_eps: float = 0.2, reduction: str = "token_mean"
) -> LossOut:
    """PPO's clipped surrogate where the advantage is negative; plain `-A r` (no clip) where
    it is positive, so good samples keep their whole gradient."""
    mask_BT, log_ratio_BT, adv_BT = policy_inputs(outputs, batch)
    ratio_BT = jnp.exp(log_ratio_BT)
    lo, hi = clip_range(clip_eps, None, None)
    clipped_BT, clipped_on_BT = clipped_surrogate(ratio_BT, adv_BT, lo, hi)
    per_token_BT = jnp.where(adv_BT > 0, -adv_BT * ratio_BT, clipped_BT)
    loss = reduce_tokens(
        per_token_BT, mask_BT, reduction, batch["token_count"], batch["sequence_count"]
    )
    clipped_on_BT = clipped_on_BT & (adv_BT <= 0)
    return LossOut(loss, policy_metrics(loss, outputs, batch, mask_BT, log_ratio_BT, clipped_on_BT))


# Parts that break the contract in what they return (tests/losses/test_part_returns.py).
def per_row_loss(outputs, batch) -> LossOut:
    """Forgot to reduce over the batch: a [B] loss."""
    mask = batch["response_mask"]
    per_row = -jnp.sum(batch["advantages"] * outputs["logprobs"] * mask, axis=1)
    return LossOut(per_row, {"custom/loss": jnp.mean(per_row)})


def dpo_without_accuracy(outputs, batch, beta) -> LossOut:
    """A DPO-family loss that reports only its value (no `dpo/accuracy`)."""
    d = outputs["logps"] - batch["ref_logps"]
    loss = -jnp.mean(jax.nn.log_sigmoid(beta * (d[:, 0] - d[:, 1])))
    return LossOut(loss, {"dpo/loss": loss})


def value_loss_per_token(outputs, batch) -> LossOut:
    """Metrics that are not scalars."""
    err = (outputs["values"] - batch["returns"]) * batch["response_mask"]
    return LossOut(jnp.mean(err**2), {"custom/value_err": err})
