"""Step 2: the reward model, trained on K-wise rankings.

Each batch element is one prompt with its K completions ([B, K, L]). Every completion is
forwarded once; the loss forms all C(K, 2) pairs from the K scalars (InstructGPT eq. 1),
so a completion is not re-encoded K-1 times and each prompt counts once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.data.pack import is_packed
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig, scalar_forward
from rlhf_jax.models.heads import reward_token_index
from rlhf_jax.steps.packed import prompt_view, slot_last_index, slots_shape
from rlhf_jax.steps.state import make_supervised_step
from rlhf_jax.types import LossOut


def score_sequences(
    model_config: ModelConfig, params: dict, input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """Reward of each sequence [N], read where transformers' `*ForSequenceClassification`
    reads it: the last real token that is not `model_config.pad_token_id` (the EOS when pad
    != EOS; the token before the EOS when pad == EOS). See `reward_token_index`."""
    values = scalar_forward(model_config, params, input_ids, attention_mask)
    idx = reward_token_index(input_ids, attention_mask, model_config.pad_token_id)
    return jnp.take_along_axis(values, idx[:, None], axis=-1)[:, 0]


def packed_rewards(model_config: ModelConfig, params: dict, batch: dict) -> jax.Array:
    """[R * P, K] rewards of a packed batch (`data/pack.py`), each read where
    `score_sequences` reads its padded row: the segment's last real token that is not the
    pad id. Empty slots read position 0 (the loss zeroes them, as for padded completions)."""
    r, p, k = slots_shape(batch)
    ids, mask, seg = (batch[key] for key in ("input_ids", "attention_mask", "segment_ids"))
    values_RT = scalar_forward(model_config, params, ids, mask, seg)
    keep_RT = jnp.asarray(mask) > 0
    if model_config.pad_token_id is not None:
        keep_RT = keep_RT & (jnp.asarray(ids) != model_config.pad_token_id)
    idx_RS = slot_last_index(keep_RT, seg, p * k)
    return jnp.take_along_axis(values_RT, idx_RS, axis=-1).reshape(r * p, k)


def completion_rewards(model_config: ModelConfig, params: dict, batch: dict) -> jax.Array:
    """[B, K] rewards of the K completions of each prompt, in one forward over B*K rows
    ([R * P, K] for a packed batch: `packed_rewards`)."""
    if is_packed(batch):
        return packed_rewards(model_config, params, batch)
    b, k, length = batch["input_ids"].shape
    flat_ids = batch["input_ids"].reshape(b * k, length)
    flat_mask = batch["attention_mask"].reshape(b * k, length)
    return score_sequences(model_config, params, flat_ids, flat_mask).reshape(b, k)


def make_reward_step(
    model_config: ModelConfig, loss_fn: Callable[..., LossOut], grad_accum: int = 1
) -> Callable:
    """`step(state, batch, key) -> (state, metrics)`.

    batch: `input_ids`, `attention_mask` [B, K, L]; `rank` [B, K] (0 best);
    `completion_mask` [B, K] (prompts with fewer than K completions are padded); or the
    packed layout of `data/pack.py`, which the loss sees as R * P prompts (`prompt_view`).
    `loss_fn(outputs, batch)` receives `{"rewards": [B, K]}` and the (micro-)batch with the
    whole batch's `pair_count` and `prompt_count` added (`losses.accumulation`).
    """

    def compute_loss(params, batch):
        rewards = completion_rewards(model_config, params, batch)
        out = loss_fn({"rewards": rewards}, prompt_view(batch) if is_packed(batch) else batch)
        return out.loss, out.metrics

    def counts(batch):
        return batch_counts("reward", loss_fn, prompt_view(batch) if is_packed(batch) else batch)

    return make_supervised_step(compute_loss, grad_accum, counts)


def normalize_reward_bias(params: dict, scores: jax.Array) -> dict:
    """Shift the head bias so `scores` (the RM's rewards of the SFT demonstrations) average 0,
    as InstructGPT does after RM training. Rankings are unaffected."""
    head = dict(params["head"])
    head["bias"] = (head["bias"] - jnp.mean(scores)).astype(head["bias"].dtype)
    return {**params, "head": head}
