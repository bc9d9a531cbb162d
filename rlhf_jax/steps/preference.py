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

from rlhf_jax.data.pack import is_packed
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig, forward, hidden_states
from rlhf_jax.models.token_stats import logits_chunk, next_token_stats
from rlhf_jax.models.transformer import segment_positions
from rlhf_jax.ops import token_logprobs
from rlhf_jax.steps.packed import prompt_view, slot_sums, slots_shape
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


def _token_logps(model_config: ModelConfig, params, ids, mask, segment_ids=None) -> jax.Array:
    """[N, T - 1] log-probs of tokens 1..T-1 of rows [N, T], each from the position before."""
    n, length = ids.shape
    if logits_chunk(model_config, n, length):  # no [N, T, V] logits (models.token_stats)
        h = hidden_states(model_config, params, ids, mask, segment_ids)
        return next_token_stats(model_config, params, h, ids).logprobs
    logits = forward(model_config, params, ids, mask, segment_ids)
    return token_logprobs(logits[:, :-1], ids[:, 1:])


def packed_target_mask(batch: dict) -> jax.Array:
    """[R, T - 1] of a packed batch (`data/pack.py`): 1 on token t + 1 when it is a completion
    token of its segment (segment position >= its prompt's `completion_start`, and never a
    segment's first token, which no position of its own sequence predicts), as
    `completion_token_mask` marks the padded rows' targets."""
    r, p, k = slots_shape(batch)
    seg_RT = jnp.asarray(batch["segment_ids"], jnp.int32)
    prompt_RT = jnp.maximum(seg_RT - 1, 0) // k
    start_RT = jnp.take_along_axis(jnp.asarray(batch["completion_start"]), prompt_RT, axis=-1)
    pos_RT = segment_positions(seg_RT)
    real_RT = (seg_RT > 0) & (jnp.asarray(batch["attention_mask"]) > 0)
    target_RT = real_RT & (pos_RT >= jnp.maximum(start_RT, 1))
    return target_RT[:, 1:].astype(jnp.float32)


def packed_completion_logps(model_config: ModelConfig, params, batch: dict):
    """`(logps [R * P, K], tokens [R * P, K])` of a packed batch: `completion_logps` of the
    prompts it holds, in one forward over its R rows."""
    r, p, k = slots_shape(batch)
    ids, mask, seg = (batch[key] for key in ("input_ids", "attention_mask", "segment_ids"))
    token_logps = _token_logps(model_config, params, ids, mask, seg)
    target = packed_target_mask(batch)
    seg_next = jnp.asarray(seg)[:, 1:]  # the segment of each scored token
    logps = slot_sums(token_logps * target, seg_next, p * k).reshape(r * p, k)
    return logps, packed_completion_tokens(batch)


def packed_completion_tokens(batch: dict) -> jax.Array:
    """[R * P, K]: the completion tokens each slot of a packed batch scores."""
    r, p, k = slots_shape(batch)
    seg_next = jnp.asarray(batch["segment_ids"])[:, 1:]
    return slot_sums(packed_target_mask(batch), seg_next, p * k).reshape(r * p, k)


def completion_logps(model_config: ModelConfig, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """`(logps [B, K], tokens [B, K])`: log pi(completion | prompt) of every completion, in one
    forward over the B*K rows ([R * P, K] for a packed batch, `packed_completion_logps`)."""
    if is_packed(batch):
        return packed_completion_logps(model_config, params, batch)
    b, k, length = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(b * k, length)
    mask = batch["attention_mask"].reshape(b * k, length)
    token_logps = _token_logps(model_config, params, ids, mask)
    return sum_completion_logps(token_logps.reshape(b, k, length - 1), batch)


def _loss_out(model_config, loss_fn, params, batch) -> LossOut:
    logps, tokens = completion_logps(model_config, params, batch)
    view = prompt_view(batch) if is_packed(batch) else batch
    return loss_fn({"logps": logps}, {**view, "completion_tokens": tokens})


def make_preference_step(
    model_config: ModelConfig, loss_fn: Callable[..., LossOut], grad_accum: int = 1
) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`.

    batch: the ranking batch (`input_ids`, `attention_mask` [B, K, L]; `rank`,
    `completion_mask` [B, K]; `completion_start` [B]) and `ref_logps` [B, K], or the packed
    layout of `data/pack.py` (its [R, P, K] arrays seen as R * P prompts).
    `loss_fn(outputs, batch)` receives `{"logps": [B, K]}` and the (micro-)batch with
    `completion_tokens` [B, K] and the whole batch's `pair_count` and `prompt_count` added
    (`losses.accumulation`); `beta` and the loss's hyperparameters are bound.
    """

    def compute_loss(params, batch):
        out = _loss_out(model_config, loss_fn, params, batch)
        return out.loss, out.metrics

    def counts(batch):  # what the loss sees, on the whole batch (completion_tokens included)
        if is_packed(batch):
            view = {**prompt_view(batch), "completion_tokens": packed_completion_tokens(batch)}
        else:
            tokens = jnp.sum(completion_token_mask(batch)[..., 1:], axis=-1)
            view = {**batch, "completion_tokens": tokens}
        return batch_counts("preference", loss_fn, view)

    return make_supervised_step(compute_loss, grad_accum, counts)


def make_logps_fn(model_config: ModelConfig) -> Callable:
    """`fn(params, batch) -> [B, K]` summed completion log-probs: the reference's before
    training, and the policy's when evaluating ([R * P, K] of a packed batch)."""

    def fn(params, batch):
        return completion_logps(model_config, params, batch)[0]

    return fn
