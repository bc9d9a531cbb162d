"""The pretraining term of PPO-ptx (InstructGPT eq. 2): gamma * E_{x ~ D_pretrain}[log pi(x)]."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses.accumulation import count_or_local, ptx_target_mask
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean, next_token_logprobs
from rlhf_jax.types import LossOut

READS = ("input_ids", "attention_mask", "token_count")


@register_loss("ptx", "default", reads=READS)
@register_loss("ptx", "pretrain_nll", reads=READS)
def pretrain_nll(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = -1/N sum_t log pi(x_{t+1} | x_<=t)` over the next-token pairs whose context and
    target are both real tokens, N their number in the whole pretraining batch
    (`token_count`, else the given batch's). The loss to minimise for -E log pi(x); gamma is
    applied by the caller. Temperature 1: this is the model's likelihood of text, not of
    samples.

    outputs: logits [B, T, V] (or next_token_logprobs [B, T - 1]). batch: input_ids,
    attention_mask [B, T] (left or right padding).
    """
    if "logits" in outputs:
        logp_BT = next_token_logprobs(outputs["logits"], batch["input_ids"])
    else:  # the head chunked (`steps.sft.lm_outputs`): the log-probs without the logits
        logp_BT = outputs["next_token_logprobs"]
    pair_mask_BT = ptx_target_mask(batch)
    n = count_or_local(batch, "token_count", jnp.sum(pair_mask_BT))
    loss = -masked_mean(logp_BT, pair_mask_BT, count=n)
    return LossOut(loss, {"ppo/ptx/loss": loss, "ppo/ptx/tokens": jnp.sum(pair_mask_BT)})
