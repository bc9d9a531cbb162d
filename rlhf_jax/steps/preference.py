"""Offline preference optimisation (DPO and its variants) on K-wise rankings.

Each batch element is one prompt with its K completions ([B, K, L], the reward model's ranking
batch). The policy's log-probs are summed over each completion's own tokens (never the prompt
or padding) and handed to a `preference` loss with the reference's, which were computed once
before training (`make_logps_fn` with the reference weights): the reference model is neither
kept on the device while training nor baked into the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig, forward, hidden_states
from rlhf_jax.models.token_stats import logits_chunk, next_token_stats
from rlhf_jax.ops import token_logprobs
from rlhf_jax.steps.state import make_supervised_step
from rlhf_jax.types import LossOut


def completion_token_mask(batch: dict) -> jax.Array:
    """[B, K, L]: 1 on the tokens of each completion (position >= `completion_start` of its
    row, real), 0 on the prompt and on padding."""
    length = batch["input_ids"].shape[-1]
    start_B11 = jnp.asarray(batch["completion_start"])[:, None, None]
    after_prompt = jnp.arange(length)[None, None, :] >= start_B11
    return (after_prompt & (jnp.asarray(batch["attention_mask"]) > 0)).astype(jnp.float32)


def sum_completion_logps(token_logps_BKT: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """`(logps [B, K], tokens [B, K])` from the per-token log-probs of tokens 1..L-1 (token t
    predicted from position t - 1): summed over completion tokens only."""
    target_BKT = completion_token_mask(batch)[..., 1:]
    return jnp.sum(token_logps_BKT * target_BKT, axis=-1), jnp.sum(target_BKT, axis=-1)


def completion_logps(model_config: ModelConfig, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """`(logps [B, K], tokens [B, K])`: log pi(completion | prompt) of every completion, in one
    forward over the B*K rows."""
    b, k, length = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(b * k, length)
    mask = batch["attention_mask"].reshape(b * k, length)
    if logits_chunk(model_config, b * k, length):  # no [B*K, L, V] logits (models.token_stats)
        h = hidden_states(model_config, params, ids, mask)
        token_logps = next_token_stats(model_config, params, h, ids).logprobs
    else:
        logits = forward(model_config, params, ids, mask)
        token_logps = token_logprobs(logits[:, :-1], ids[:, 1:])
    return sum_completion_logps(token_logps.reshape(b, k, length - 1), batch)


def _loss_out(model_config, loss_fn, params, batch) -> LossOut:
    logps, tokens = completion_logps(model_config, params, batch)
    return loss_fn({"logps": logps}, {**batch, "completion_tokens": tokens})


def make_preference_step(
    model_config: ModelConfig, loss_fn: Callable[..., LossOut], grad_accum: int = 1
) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`.

    batch: the ranking batch (`input_ids`, `attention_mask` [B, K, L]; `rank`,
    `completion_mask` [B, K]; `completion_start` [B]) and `ref_logps` [B, K].
    `loss_fn(outputs, batch)` receives `{"logps": [B, K]}` and the (micro-)batch with
    `completion_tokens` [B, K] and the whole batch's `pair_count` and `prompt_count` added
    (`losses.accumulation`); `beta` and the loss's hyperparameters are bound.
    """

    def compute_loss(params, batch):
        out = _loss_out(model_config, loss_fn, params, batch)
        return out.loss, out.metrics

    def counts(batch):  # what the loss sees, on the whole batch (completion_tokens included)
        tokens = jnp.sum(completion_token_mask(batch)[..., 1:], axis=-1)
        return batch_counts("preference", loss_fn, {**batch, "completion_tokens": tokens})

    return make_supervised_step(compute_loss, grad_accum, counts)


def make_logps_fn(model_config: ModelConfig) -> Callable:
    """`fn(params, batch) -> [B, K]` summed completion log-probs: the reference's before
    training, and the policy's when evaluating."""

    def fn(params, batch):
        return completion_logps(model_config, params, batch)[0]

    return fn
