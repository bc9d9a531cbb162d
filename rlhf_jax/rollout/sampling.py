"""Turning next-token logits into a token: temperature, top-k, top-p (nucleus), greedy.

The log-prob returned with each token is under the distribution it was sampled from, so PPO's
"old policy" log-probs come straight from the rollout (with temperature applied, as the
N-implementation-details study of RLHF insists).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.logprobs import filter_logits

__all__ = ["filter_logits", "inverse_cdf_sample", "sample_token", "sampling_log_probs"]


def sampling_log_probs(
    logits_BV: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Log-probabilities [B, V] of the distribution tokens are drawn from.

    temperature == 0 (greedy) gives the plain log_softmax of the logits.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jax.nn.log_softmax(logits_BV, axis=-1)
    return jax.nn.log_softmax(filter_logits(logits_BV / temperature, top_k, top_p), axis=-1)


def inverse_cdf_sample(rng: jax.Array, logp_BV: jax.Array) -> jax.Array:
    """One draw per row from the distribution exp(logp): the first token whose cumulative
    probability exceeds u * total, u uniform in (0, 1].

    Exact like the Gumbel-max trick of `jax.random.categorical`, but it needs one random
    number per row instead of one per vocabulary entry (~5x cheaper per decode step on CPU at
    a 8k vocabulary). A token of probability 0 (filtered out) is never drawn: its cumulative
    probability equals its predecessor's, so no u lands on it.
    """
    cdf_BV = jnp.cumsum(jnp.exp(logp_BV), axis=-1)
    u_B1 = 1.0 - jax.random.uniform(rng, (logp_BV.shape[0], 1), jnp.float32)
    token_B = jnp.sum(cdf_BV < u_B1 * cdf_BV[:, -1:], axis=-1)
    return jnp.minimum(token_B, logp_BV.shape[-1] - 1)


def sample_token(
    logits_BV: jax.Array,
    rng: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob under the sampling distribution: ([B], [B])."""
    logp_BV = sampling_log_probs(logits_BV, temperature, top_k, top_p)
    if temperature == 0:
        token_B = jnp.argmax(logits_BV, axis=-1)
    else:
        token_B = inverse_cdf_sample(rng, logp_BV)
    token_B = token_B.astype(jnp.int32)
    return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
