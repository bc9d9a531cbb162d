"""Scalar heads (reward, value) on the decoder trunk.

Params of a scalar model are `{"trunk": decoder params, "head": {"kernel": [D], "bias": []}}`;
the trunk never holds an LM head (`scalar_trunk`): a scalar model reads hidden states only,
and an untied head (plus its Adam moments when it trains) would be dead weight (~6 GB at 8B).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import hidden_states, param_logical_axes


def init_scalar_head(config: ModelConfig, rng: jax.Array) -> dict:
    """Head weights ~ N(0, 1/sqrt(d_model + 1)), bias 0 (Stiennon et al. 2020; N-details #12)."""
    std = 1.0 / jnp.sqrt(config.d_model + 1.0)
    kernel = std * jax.random.normal(rng, (config.d_model,), jnp.float32)
    return {
        "kernel": kernel.astype(config.weight_dtype),
        "bias": jnp.zeros((), config.weight_dtype),
    }


def scalar_trunk(trunk: dict) -> dict:
    """A decoder's params (or any tree of that layout) without the untied LM head: what a
    reward model or critic keeps of the trunk it starts from. Tied embeddings stay (they are
    the token embedding too)."""
    return {k: v for k, v in trunk.items() if k != "lm_head"}


def scalar_head_logical_axes() -> dict:
    return {"kernel": PartitionSpec("embed"), "bias": PartitionSpec()}


def scalar_model_logical_axes(config: ModelConfig) -> dict:
    """Logical axis names of `{"trunk", "head"}` params, for the sharding rules."""
    return {"trunk": scalar_trunk(param_logical_axes(config)), "head": scalar_head_logical_axes()}


def scalar_forward(
    config: ModelConfig,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Per-token scalars [B, T] (float32) read from the final hidden state of each token
    (`segment_ids`: packed rows, as `transformer.forward` takes them)."""
    h_BTD = hidden_states(config, params["trunk"], input_ids, attention_mask, segment_ids)
    return scalar_head(params["head"], h_BTD)


def scalar_head(head: dict, h_BTD: jax.Array) -> jax.Array:
    """The head `{"kernel": [D], "bias": []}` on hidden states [B, T, D]: float32 [B, T]."""
    out = jnp.einsum(
        "btd,d->bt",
        h_BTD,
        head["kernel"].astype(h_BTD.dtype),
        preferred_element_type=jnp.float32,
    )
    return out + head["bias"].astype(jnp.float32)


def last_token_index(mask_BT: jax.Array) -> jax.Array:
    """Index of each row's last real token ([B] int32); 0 for an all-padding row."""
    t = mask_BT.shape[-1]
    positions = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(mask_BT > 0, positions, 0), axis=-1).astype(jnp.int32)


def reward_token_index(ids_BT: jax.Array, mask_BT: jax.Array, pad_id: int | None) -> jax.Array:
    """Where a reward model reads each row ([B] int32): the last real token whose id is not
    `pad_id`, the rule of transformers' `*ForSequenceClassification` (the rightmost token that
    is not `config.pad_token_id`). With pad != EOS that is the last real token, the EOS of a
    finished response; with pad == EOS it is the token before the EOS. `pad_id` None: the
    last real token."""
    real_BT = mask_BT > 0
    if pad_id is not None:
        real_BT = real_BT & (ids_BT != pad_id)
    return last_token_index(real_BT)


def value_at_last_token(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """values[b, last real token of b] -> [B]; works for left- and right-padded rows."""
    idx = last_token_index(mask_BT)
    return jnp.take_along_axis(values_BT, idx[:, None], axis=-1)[:, 0]
