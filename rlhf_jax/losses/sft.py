"""Step 1: next-token cross-entropy on the demonstration's completion tokens.

Denominators are the whole batch's `token_count` / `sequence_count` when the step passes them
(`losses.accumulation`: exact under gradient accumulation), else the given batch's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.accumulation import count_or_local, sft_target_mask
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean, next_token_logprobs
from rlhf_jax.types import LossOut

READS = ("input_ids", "loss_mask", "token_count", "sequence_count")


def _targets(outputs: Arrays, batch: Arrays) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shifted log-probs, target mask and argmax hits, all [B, T - 1].

    loss_mask[b, t] = 1 marks input_ids[b, t] as a target (completion, not prompt or padding);
    the logits at t - 1 score it, so the mask is shifted left by one with the tokens.
    """
    input_ids_BT = batch["input_ids"]
    mask_BT = sft_target_mask(batch)
    if "logits" not in outputs:  # the head chunked (`steps.sft.lm_outputs`): no logits
        hit_BT = outputs["next_token_argmax"] == input_ids_BT[:, 1:]
        return outputs["next_token_logprobs"], mask_BT, hit_BT
    logits_BTV = outputs["logits"]
    logp_BT = next_token_logprobs(logits_BTV, input_ids_BT)
    hit_BT = jnp.argmax(logits_BTV[:, :-1], axis=-1) == input_ids_BT[:, 1:]
    return logp_BT, mask_BT, hit_BT


@register_loss("sft", "default", reads=READS)
@register_loss("sft", "sft_cross_entropy", reads=READS)
def sft_cross_entropy(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = -1/N sum_{target tokens t} log pi(x_t | x_<t)`, N = number of target tokens in the
    whole batch (`token_count`; token mean: long completions weigh more, as in the usual SFT
    recipe).

    outputs: logits [B, T, V] (or, with the head chunked, next_token_logprobs and
    next_token_argmax [B, T - 1]). batch: input_ids [B, T], loss_mask [B, T] (target tokens).
    """
    logp_BT, mask_BT, hit_BT = _targets(outputs, batch)
    n = count_or_local(batch, "token_count", jnp.sum(mask_BT))
    loss = -masked_mean(logp_BT, mask_BT, count=n)
    return LossOut(loss, _metrics(loss, mask_BT, hit_BT, n))


def _metrics(loss: jax.Array, mask_BT, hit_BT, n_tokens: jax.Array) -> dict[str, jax.Array]:
    return {
        "sft/loss": loss,
        "sft/tokens": jnp.sum(mask_BT),
        "sft/accuracy": masked_mean(hit_BT, mask_BT, count=n_tokens),
    }


@register_loss("sft", "sft_sequence_mean", reads=READS)
def sft_sequence_mean(outputs: Arrays, batch: Arrays) -> LossOut:
    """`L = -1/B' sum_b (1/N_b sum_{t in b} log pi(x_t | x_<t))`: each sequence's token mean,
    then the mean over the B' sequences (rows) of the whole batch that have targets
    (`sequence_count`), so every demonstration weighs the same whatever its length. Same
    inputs and metric names as `sft_cross_entropy` ("sft/loss" is this loss; accuracy stays a
    token mean).
    """
    logp_BT, mask_BT, hit_BT = _targets(outputs, batch)
    per_seq_B = masked_mean(logp_BT, mask_BT, axis=1)
    has_targets_B = (jnp.sum(mask_BT, axis=1) > 0).astype(jnp.float32)
    n_seqs = count_or_local(batch, "sequence_count", jnp.sum(has_targets_B))
    loss = -masked_mean(per_seq_B, has_targets_B, count=n_seqs)
    n_tokens = count_or_local(batch, "token_count", jnp.sum(mask_BT))
    return LossOut(loss, _metrics(loss, mask_BT, hit_BT, n_tokens))
