"""Step 1 (and base-model pretraining): next-token loss on the target tokens of a batch."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig, forward, hidden_states
from rlhf_jax.models.token_stats import logits_chunk, next_token_stats
from rlhf_jax.steps.state import make_supervised_step
from rlhf_jax.types import LossOut


def lm_outputs(
    model_config: ModelConfig,
    params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    segment_ids: jax.Array | None = None,
) -> dict:
    """What an SFT-kind (or ptx) loss receives: `{"logits": [B, T, V]}` of the (possibly
    packed) batch, or, when `model.logits_chunk` chunks the head (`models.token_stats`),
    `{"next_token_logprobs", "next_token_argmax"}` [B, T - 1] computed without them."""
    if not logits_chunk(model_config, *input_ids.shape):
        return {"logits": forward(model_config, params, input_ids, attention_mask, segment_ids)}
    h_BTD = hidden_states(model_config, params, input_ids, attention_mask, segment_ids)
    stats = next_token_stats(model_config, params, h_BTD, jnp.asarray(input_ids, jnp.int32))
    return {"next_token_logprobs": stats.logprobs, "next_token_argmax": stats.argmax}


def make_sft_step(
    model_config: ModelConfig, loss_fn: Callable[..., LossOut], grad_accum: int = 1
) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`.

    batch: `input_ids`, `attention_mask`, `loss_mask` ([B, T]; loss_mask marks target tokens),
    and `segment_ids` when several sequences are packed into each row.
    `loss_fn(outputs, batch)` receives `{"logits": [B, T, V]}` and the (micro-)batch with the
    whole batch's `token_count` and `sequence_count` added (`losses.accumulation`: exact under
    `grad_accum`); hyperparameters are bound.
    """

    def compute_loss(params, batch):
        outputs = lm_outputs(
            model_config, params, batch["input_ids"], batch["attention_mask"],
            batch.get("segment_ids"),
        )  # fmt: skip
        out = loss_fn(outputs, batch)
        return out.loss, out.metrics

    return make_supervised_step(
        compute_loss, grad_accum, functools.partial(batch_counts, "sft", loss_fn)
    )
