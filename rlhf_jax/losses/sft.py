"""Step 1: next-token cross-entropy on the demonstration's completion tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean, next_token_logprobs
from rlhf_jax.types import LossOut

READS = ("input_ids", "loss_mask")


def _targets(outputs: Arrays, batch: Arrays) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shifted log-probs, target mask and argmax hits, all [B, T - 1].

    loss_mask[b, t] = 1 marks input_ids[b, t] as a target (completion, not prompt or padding);
    the logits at t - 1 score it, so the mask is shifted left by one with the tokens.
    """
    logits_BTV = outputs["logits"]
    input_ids_BT = batch["input_ids"]
    logp_BT = next_token_logprobs(logits_BTV, input_ids_BT)
    mask_BT = jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]
    hit_BT = jnp.argmax(logits_BTV[:, :-1], axis=-1) == input_ids_BT[:, 1:]
    return logp_BT, mask_BT, hit_BT


@register_loss("sft", "default", reads=READS)
@register_loss("sft", "sft_cross_entropy", reads=READS)
def sft_cross_entropy(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = -1/N sum_{target tokens t} log pi(x_t | x_<t)`, N = number of target tokens in the
    batch (token mean: long completions weigh more, as in the usual SFT recipe).

    outputs: logits [B, T, V]. batch: input_ids [B, T], loss_mask [B, T] (target tokens).
    """
    logp_BT, mask_BT, hit_BT = _targets(outputs, batch)
    loss = -masked_mean(logp_BT, mask_BT)
    metrics = {
        "sft/loss": loss,
        "sft/tokens": jnp.sum(mask_BT),
        "sft/accuracy": masked_mean(hit_BT, mask_BT),
    }
    return LossOut(loss, metrics)


@register_loss("sft", "sft_sequence_mean", reads=READS)
def sft_sequence_mean(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = -1/B' sum_b (1/N_b sum_{t in b} log pi(x_t | x_<t))`: each sequence's token mean,
    then the mean over the B' sequences that have targets, so every demonstration weighs the
    same whatever its length. Same inputs and metric names as `sft_cross_entropy`
    ("sft/loss" is this loss; accuracy stays a token mean).
    """
    logp_BT, mask_BT, hit_BT = _targets(outputs, batch)
    per_seq_B = masked_mean(logp_BT, mask_BT, axis=1)
    has_targets_B = (jnp.sum(mask_BT, axis=1) > 0).astype(jnp.float32)
    loss = -masked_mean(per_seq_B, has_targets_B)
    metrics = {
        "sft/loss": loss,
        "sft/tokens": jnp.sum(mask_BT),
        "sft/accuracy": masked_mean(hit_BT, mask_BT),
    }
    return LossOut(loss, metrics)
