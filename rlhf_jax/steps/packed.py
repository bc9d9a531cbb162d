"""Reading packed ranking batches (`data/pack.py`) back as the padded batch's prompts.

A packed row holds several prompts' sequences; segment id `p * K + k + 1` marks slot p's
completion k. What the steps need per (prompt, completion) is a reduction over that segment's
tokens (a sum of log-probs, the position of the reward token): one `segment_*` over the row's
slots, then [R, P * K] -> [R * P, K] prompts, on which the losses run unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from rlhf_jax.data.pack import TOKEN_KEYS

PACKED_TOKEN_KEYS = (*TOKEN_KEYS, "segment_ids")


def slots_shape(batch: Mapping) -> tuple[int, int, int]:
    """`(R, P, K)` of a packed batch: rows, prompt slots per row, completions per prompt."""
    return tuple(jnp.shape(batch["rank"]))


def prompt_view(batch: Mapping) -> dict:
    """The packed batch's per-prompt arrays [R, P, ...] as [R * P, ...] prompts (token arrays
    and scalars such as the step's counts left as they are): what the losses and
    `batch_counts` read."""
    r, p, _ = slots_shape(batch)

    def view(key, x):
        if key in PACKED_TOKEN_KEYS or tuple(jnp.shape(x)[:2]) != (r, p):
            return x
        return jnp.reshape(x, (r * p, *jnp.shape(x)[2:]))

    return {key: view(key, x) for key, x in batch.items()}


def _flat_slots(segment_ids_RT: jax.Array, n_slots: int) -> jax.Array:
    """Each token's slot over the whole batch, `row * n_slots + segment - 1`; padding goes to
    the extra last slot R * n_slots, which the callers drop."""
    r = segment_ids_RT.shape[0]
    seg = segment_ids_RT.astype(jnp.int32)
    flat = jnp.arange(r, dtype=jnp.int32)[:, None] * n_slots + seg - 1
    return jnp.where(seg > 0, flat, r * n_slots)


def slot_sums(values_RT: jax.Array, segment_ids_RT: jax.Array, n_slots: int) -> jax.Array:
    """[R, n_slots]: the sum of `values` over each slot's tokens (0 for an empty slot)."""
    r = values_RT.shape[0]
    ids = _flat_slots(segment_ids_RT, n_slots).reshape(-1)
    sums = jax.ops.segment_sum(values_RT.reshape(-1), ids, num_segments=r * n_slots + 1)
    return sums[:-1].reshape(r, n_slots)


def slot_last_index(keep_RT: jax.Array, segment_ids_RT: jax.Array, n_slots: int) -> jax.Array:
    """[R, n_slots] int32: the last position of each slot where `keep` holds (0 when none,
    as `models.last_token_index` gives an all-padding row)."""
    r, t = keep_RT.shape
    at = jnp.where(keep_RT, jnp.arange(t, dtype=jnp.int32)[None, :], 0)
    ids = _flat_slots(segment_ids_RT, n_slots).reshape(-1)
    last = jax.ops.segment_max(at.reshape(-1), ids, num_segments=r * n_slots + 1)
    return jnp.maximum(last[:-1], 0).reshape(r, n_slots)
