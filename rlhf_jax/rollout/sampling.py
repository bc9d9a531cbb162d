"""Turning next-token logits into a token: temperature, top-k, top-p (nucleus), greedy.

The log-prob returned with each token is under the distribution it was sampled from, so PPO's
"old policy" log-probs come straight from the rollout (with temperature applied, as the
N-implementation-details study of RLHF insists).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.logprobs import (
    filter_logits,
    is_greedy,
    pack_support,
    truncates,
)

__all__ = [
    "filter_logits",
    "first_argmax",
    "inverse_cdf_sample",
    "is_greedy",
    "sample_token",
    "sample_token_and_support",
    "sampling_log_probs",
]


def sampling_log_probs(
    logits_BV: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Log-probabilities [B, V] of the distribution tokens are drawn from.

    A greedy temperature (`is_greedy`) gives the plain log_softmax of the logits.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if is_greedy(temperature):
        return jax.nn.log_softmax(logits_BV, axis=-1)
    return jax.nn.log_softmax(filter_logits(_tempered(logits_BV, temperature), top_k, top_p), -1)


def _tempered(logits_BV: jax.Array, temperature: float) -> jax.Array:
    """`logits / temperature`, shifted so that each row's maximum is exactly 0.

    The shift comes before the division: at temperature 1e-12, logits / T are ~1e13, where
    float32 keeps no digit of the differences between logits and the compiled log-softmax
    rounds the maximum's own term to about +-1e6 (an inf log-prob and a garbage token, EOS
    with log-prob -inf). (x - max) / T is <= 0 with the maximum exactly 0, so every positive
    temperature gives its distribution: the greedy token for a tiny one.
    """
    if temperature == 1.0:  # the common path: no extra pass (and the same bits as before)
        return logits_BV
    return (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / temperature


# Vocabulary block of the two-level inverse-CDF draw: the prefix sum runs over B x V/128
# block totals and over the 128 entries of one block per row, never over all V entries.
_CDF_BLOCK = 128


# Which rows of a larger batch a compacted batch holds: (row index [B] of each, the larger
# batch's row count). A row's random draw is that of its row in the larger batch, so rows
# moved into a smaller batch draw what they would have drawn where they were.
DrawRows = tuple[jax.Array, int]


def _uniform_B1(rng: jax.Array, b: int, rows: DrawRows | None) -> jax.Array:
    if rows is None:
        return jax.random.uniform(rng, (b, 1), jnp.float32)
    rows_B, total = rows
    return jnp.take(jax.random.uniform(rng, (total, 1), jnp.float32), rows_B, axis=0, mode="clip")


def inverse_cdf_sample(
    rng: jax.Array, logp_BV: jax.Array, rows: DrawRows | None = None
) -> jax.Array:
    """One draw per row from the distribution exp(logp): the first token whose cumulative
    probability reaches u * total, u uniform in (0, 1].

    Exact like the Gumbel-max trick of `jax.random.categorical`, but it needs one random
    number per row instead of one per vocabulary entry (~5x cheaper per decode step on CPU at
    a 8k vocabulary). It runs in two levels, because a prefix sum over the whole vocabulary
    is the slowest op of a decode step on CPU (5.2 ms at [32, 50257], against 0.5 ms for a
    plain reduction): first the block whose cumulative total reaches u * total, then the
    token inside that block. A token of probability 0 (filtered out) is never drawn: its
    cumulative probability equals its predecessor's, so no u lands on it; a block of total
    0 is skipped the same way. `rows`: see `DrawRows`.
    """
    b, v = logp_BV.shape
    n_blocks = -(-v // _CDF_BLOCK)
    p_BV = jnp.exp(logp_BV)
    # Block totals by a strided window sum (the ragged last block padded inside the reduction,
    # no padded copy of p).
    block_total_BN = jax.lax.reduce_window(
        p_BV,
        0.0,
        jax.lax.add,
        (1, _CDF_BLOCK),
        (1, _CDF_BLOCK),
        ((0, 0), (0, n_blocks * _CDF_BLOCK - v)),
    )
    block_cdf_BN = jnp.cumsum(block_total_BN, axis=-1)
    u_B1 = 1.0 - _uniform_B1(rng, b, rows)
    target_B1 = u_B1 * block_cdf_BN[:, -1:]  # <= the total, so some block reaches it
    block_B = jnp.minimum(jnp.sum(block_cdf_BN < target_B1, axis=-1), n_blocks - 1)
    before_B1 = jnp.where(
        block_B[:, None] > 0,
        jnp.take_along_axis(block_cdf_BN, jnp.maximum(block_B - 1, 0)[:, None], axis=-1),
        0.0,
    )
    index_K = jnp.arange(_CDF_BLOCK)
    token_BK = block_B[:, None] * _CDF_BLOCK + index_K
    p_BK = jnp.where(
        token_BK < v, jnp.take_along_axis(p_BV, jnp.minimum(token_BK, v - 1), axis=-1), 0.0
    )
    cdf_BK = before_B1 + jnp.cumsum(p_BK, axis=-1)
    # Summed in another order than the block total, the block's own prefix sums may end a
    # rounding error short of the target: then take its last token of nonzero probability.
    last_nonzero_B = jnp.max(jnp.where(p_BK > 0, index_K, 0), axis=-1)
    in_block_B = jnp.minimum(jnp.sum(cdf_BK < target_B1, axis=-1), last_nonzero_B)
    return jnp.minimum(block_B * _CDF_BLOCK + in_block_B, v - 1)


def first_argmax(x_BV: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first maximal index) as a max and a min-reduction.

    XLA:CPU lowers argmax to one variadic (value, index) reduction that does not vectorise:
    3.6 ms at [32, 50257], against 0.8 ms for this. A row with a NaN gets index V - 1.
    """
    v = x_BV.shape[-1]
    index_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
    is_max_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(is_max_BV, index_BV, v), axis=-1), v - 1)


def sample_token(
    logits_BV: jax.Array,
    rng: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    rows: DrawRows | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob under the sampling distribution: ([B], [B]).
    A greedy temperature (`is_greedy`: 0) takes the argmax, with its log-prob at
    temperature 1."""
    if is_greedy(temperature):
        # log_softmax at the chosen token only: no [B, V] array of log-probs is written.
        logits_BV = logits_BV.astype(jnp.float32)
        token_B = first_argmax(logits_BV)
        # The chosen logit is the row's maximum: log_softmax's (x - max) - log sum exp(x - max).
        max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
        log_total_B = jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1))
        return token_B, -log_total_B
    logp_BV = sampling_log_probs(logits_BV, temperature, top_k, top_p)
    token_B = inverse_cdf_sample(rng, logp_BV, rows).astype(jnp.int32)
    return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


def sample_token_and_support(
    logits_BV: jax.Array,
    rng: jax.Array,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    rows: DrawRows | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`sample_token`'s (token [B], log-prob [B]) and the support the token was drawn from,
    packed (`ops.pack_support`, uint32 [B, ceil(V / 32)]); None when nothing is truncated
    (greedy, or no top-k / top-p), the support then being the whole vocabulary.

    The same draw as `sample_token` (same key, same token). The trainer and the reference
    renormalise over this recorded support (docs/algorithms.md)."""
    if temperature == 0 or not truncates(top_k, top_p, logits_BV.shape[-1]):
        return (*sample_token(logits_BV, rng, temperature, top_k, top_p, rows), None)
    filtered_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k, top_p)
    logp_BV = jax.nn.log_softmax(filtered_BV, axis=-1)
    token_B = inverse_cdf_sample(rng, logp_BV, rows).astype(jnp.int32)
    logp_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B, logp_B, pack_support(filtered_BV > jnp.finfo(filtered_BV.dtype).min)
