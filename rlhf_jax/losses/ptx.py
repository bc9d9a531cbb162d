"""The pretraining term of PPO-ptx (InstructGPT eq. 2): gamma * E_{x ~ D_pretrain}[log pi(x)]."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean, next_token_logprobs
from rlhf_jax.types import LossOut

READS = ("input_ids", "attention_mask")


@register_loss("ptx", "default", reads=READS)
@register_loss("ptx", "pretrain_nll", reads=READS)
def pretrain_nll(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = -1/N sum_t log pi(x_{t+1} | x_<=t)` over the N next-token pairs whose context and
    target are both real tokens (the loss to minimise for -E log pi(x); gamma is applied by
    the caller). Temperature 1: this is the model's likelihood of text, not of samples.

    outputs: logits [B, T, V]. batch: input_ids, attention_mask [B, T] (left or right padding).
    """
    logp_BT = next_token_logprobs(outputs["logits"], batch["input_ids"])
    attn_BT = jnp.asarray(batch["attention_mask"], jnp.float32)
    # Both ends real: with left padding the first real token has no real context to score it.
    pair_mask_BT = attn_BT[:, :-1] * attn_BT[:, 1:]
    loss = -masked_mean(logp_BT, pair_mask_BT)
    return LossOut(loss, {"ppo/ptx/loss": loss, "ppo/ptx/tokens": jnp.sum(pair_mask_BT)})
