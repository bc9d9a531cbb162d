"""A loss living outside the library, as a research fork would write it.

Selected from config with `policy_loss: "custom_loss_module:my_loss"` (module on PYTHONPATH).
"""

import jax.numpy as jnp

from rlhf_jax.ops import masked_mean, next_token_logprobs
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
