"""Token log-probabilities and entropies from logits, with the sampling temperature applied.

The temperature divides the logits wherever log-probs are taken (rollout, reference, training):
forgetting it in one place makes the KL to the reference rise faster (N-implementation-details).
Both functions go through `logsumexp` rather than `log_softmax`, so no second [B, T, V] array
is materialised beside the logits (under jit the division and the exp fuse into the reduction).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _scaled(logits_BTV: jax.Array, temperature: float) -> jax.Array:
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    # Skipping the division at T = 1 keeps the common path free of one elementwise pass.
    if isinstance(temperature, int | float) and temperature == 1.0:
        return logits_BTV
    return logits_BTV / temperature


def token_logprobs(
    logits_BTV: jax.Array, tokens_BT: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """`log pi(tokens_t | ...) = z_t[token_t] - logsumexp(z_t)`, `z = logits / temperature`.

    logits_BTV[b, t] scores tokens_BT[b, t] (align beforehand, or see `next_token_logprobs`).
    Returns [B, T] in float32 (or wider).
    """
    z_BTV = _scaled(logits_BTV, temperature)
    lse_BT = jax.nn.logsumexp(z_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(z_BTV, tokens_BT[..., None].astype(jnp.int32), axis=-1)
    return picked_BT[..., 0] - lse_BT


def entropy_from_logits(logits_BTV: jax.Array, temperature: float = 1.0) -> jax.Array:
    """`H_t = -sum_v p_v log p_v = logsumexp(z_t) - sum_v p_v z_v`, `p = softmax(z)`,
    `z = logits / temperature`. Returns [B, T] in float32 (or wider)."""
    z_BTV = _scaled(logits_BTV, temperature)
    lse_BT = jax.nn.logsumexp(z_BTV, axis=-1)
    p_BTV = jnp.exp(z_BTV - lse_BT[..., None])
    return lse_BT - jnp.sum(p_BTV * z_BTV, axis=-1)


def next_token_logprobs(
    logits_BTV: jax.Array, input_ids_BT: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Teacher-forced log-probs of a causal LM: logits at t score input_ids at t + 1.

    Returns [B, T - 1]; entry t is `log pi(input_ids[t + 1] | input_ids[:t + 1])`.
    """
    return token_logprobs(logits_BTV[:, :-1], input_ids_BT[:, 1:], temperature)
