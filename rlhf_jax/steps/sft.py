"""Step 1 (and base-model pretraining): next-token loss on the target tokens of a batch."""

from __future__ import annotations

import functools
from collections.abc import Callable

from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig, forward
from rlhf_jax.steps.state import make_supervised_step
from rlhf_jax.types import LossOut


def _lm_outputs(model_config: ModelConfig, params, batch: dict) -> dict:
    """What an SFT-kind loss receives: the logits of the (possibly packed) batch."""
    logits = forward(
        model_config, params, batch["input_ids"], batch["attention_mask"], batch.get("segment_ids")
    )
    return {"logits": logits}


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
        out = loss_fn(_lm_outputs(model_config, params, batch), batch)
        return out.loss, out.metrics

    return make_supervised_step(
        compute_loss, grad_accum, functools.partial(batch_counts, "sft", loss_fn)
    )
