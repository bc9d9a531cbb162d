"""Step 1 (and base-model pretraining): next-token loss on the target tokens of a batch."""

from __future__ import annotations

from collections.abc import Callable

from rlhf_jax.models import ModelConfig, forward
from rlhf_jax.steps.state import make_supervised_step
from rlhf_jax.types import LossOut


def make_sft_step(
    model_config: ModelConfig, loss_fn: Callable[..., LossOut], grad_accum: int = 1
) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`.

    batch: `input_ids`, `attention_mask`, `loss_mask` ([B, T]; loss_mask marks target tokens),
    and `segment_ids` when several sequences are packed into each row.
    `loss_fn(outputs, batch)` receives `{"logits": [B, T, V]}`; hyperparameters are bound.
    """

    def compute_loss(params, batch):
        logits = forward(
            model_config,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("segment_ids"),
        )
        out = loss_fn({"logits": logits}, batch)
        return out.loss, out.metrics

    return make_supervised_step(compute_loss, grad_accum)


def make_sft_eval(model_config: ModelConfig, loss_fn: Callable[..., LossOut]) -> Callable:
    """`evaluate(params, batch) -> metrics` with the same loss, no update."""

    def evaluate(params, batch):
        logits = forward(
            model_config,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("segment_ids"),
        )
        return loss_fn({"logits": logits}, batch).metrics

    return evaluate
