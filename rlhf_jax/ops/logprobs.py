"""Token log-probabilities and entropies from logits, with the sampling temperature applied.

The temperature divides the logits wherever log-probs are taken (rollout, reference, training):
forgetting it in one place makes the KL to the reference rise faster (N-implementation-details).
Both functions go through `logsumexp` rather than `log_softmax`, so no second [B, T, V] array
is materialised beside the logits (under jit the division and the exp fuse into the reduction).

`token_logprobs` has a hand-written gradient: d logp_t / d z_t = onehot(token_t) - softmax(z_t),
so the backward pass is one fused elementwise pass that writes the [B, T, V] logits gradient
directly (autodiff would scatter into a zero [B, T, V] buffer for the gather, then add the
softmax term in further passes). `next_token_logprobs` shifts the *tokens*, not the logits, so
no [B, T - 1, V] slice is taken whose gradient would be padded back to [B, T, V] by a copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _scaled(logits_BTV: jax.Array, temperature: float) -> jax.Array:
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    # Skipping the division at T = 1 keeps the common path free of one elementwise pass.
    if isinstance(temperature, int | float) and temperature == 1.0:
        return logits_BTV
    return logits_BTV / temperature


def _plain_token_logprobs(logits_BTV, tokens_BT, temperature):
    z_BTV = _scaled(logits_BTV, temperature)
    lse_BT = jax.nn.logsumexp(z_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(z_BTV, tokens_BT[..., None].astype(jnp.int32), axis=-1)
    return picked_BT[..., 0] - lse_BT, lse_BT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_token_logprobs(logits_BTV, tokens_BT, temperature):
    return _plain_token_logprobs(logits_BTV, tokens_BT, temperature)[0]


def _fused_fwd(logits_BTV, tokens_BT, temperature):
    logp_BT, lse_BT = _plain_token_logprobs(logits_BTV, tokens_BT, temperature)
    return logp_BT, (logits_BTV, tokens_BT, lse_BT)


def _fused_bwd(temperature, residuals, g_BT):
    logits_BTV, tokens_BT, lse_BT = residuals
    z_BTV = _scaled(logits_BTV, temperature)
    vocab = jax.lax.broadcasted_iota(jnp.int32, z_BTV.shape, z_BTV.ndim - 1)
    onehot_BTV = (vocab == tokens_BT[..., None].astype(jnp.int32)).astype(z_BTV.dtype)
    g_BTV = g_BT[..., None].astype(z_BTV.dtype)
    d_BTV = g_BTV * (onehot_BTV - jnp.exp(z_BTV - lse_BT[..., None]))
    if not (isinstance(temperature, int | float) and temperature == 1.0):
        d_BTV = d_BTV / temperature
    return d_BTV.astype(logits_BTV.dtype), None


_fused_token_logprobs.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs(
    logits_BTV: jax.Array, tokens_BT: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """`log pi(tokens_t | ...) = z_t[token_t] - logsumexp(z_t)`, `z = logits / temperature`.

    logits_BTV[b, t] scores tokens_BT[b, t] (align beforehand, or see `next_token_logprobs`).
    Returns [B, T] in float32 (or wider). The gradient is the fused one described above when
    the temperature is a Python number (a traced temperature takes plain autodiff).
    """
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        return _fused_token_logprobs(logits_BTV, tokens_BT, float(temperature))
    return _plain_token_logprobs(logits_BTV, tokens_BT, temperature)[0]


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
    # Score every position against the next token (the last one against a dummy) and drop
    # the last column of the [B, T] result: slicing the [B, T, V] logits instead would make
    # the backward pass pad a whole logits-sized gradient back with a copy.
    targets_BT = jnp.concatenate([input_ids_BT[:, 1:], input_ids_BT[:, :1]], axis=1)
    return token_logprobs(logits_BTV, targets_BT, temperature)[:, :-1]


def filter_logits(logits_BV: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Set logits outside the top-k and the top-p nucleus to -inf (top-k applied first).

    Top-p keeps the smallest set of most likely tokens whose probability sums to >= top_p
    (always at least one). Tokens tied with the last kept logit are kept too.
    """
    neg_inf = jnp.finfo(logits_BV.dtype).min
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
        logits_BV = jnp.where(logits_BV < kth, neg_inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        sorted_desc = jnp.sort(logits_BV, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # a prefix of the sorted order, never empty
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold, neg_inf, logits_BV)
    return logits_BV


def policy_token_logprobs(
    logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs [B, T] and entropies [B, T] of tokens under the distribution they were
    *sampled* from: logits / temperature, then top-k and top-p (`filter_logits`).

    The trainer takes the policy's log-probs with this function, so they are the same function
    of the weights as the rollout's (`rollout.sampling.sampling_log_probs`), and the ratio
    pi / pi_old is exactly 1 before the first update. Without top-k / top-p this is
    `token_logprobs` (its fused gradient); with them, the kept set is chosen without gradient
    and the filtered logits get none.
    """
    if top_k is None and (top_p is None or top_p >= 1.0):
        return (
            token_logprobs(logits_BTV, tokens_BT, temperature),
            entropy_from_logits(logits_BTV, temperature),
        )
    z_BTV = _scaled(logits_BTV, temperature)
    v = z_BTV.shape[-1]
    kept_BTV = filter_logits(jax.lax.stop_gradient(z_BTV).reshape(-1, v), top_k, top_p)
    keep_BTV = (kept_BTV > jnp.finfo(kept_BTV.dtype).min).reshape(z_BTV.shape)
    z_BTV = jnp.where(keep_BTV, z_BTV, jnp.finfo(z_BTV.dtype).min)
    logp_BT, _ = _plain_token_logprobs(z_BTV, tokens_BT, 1.0)
    return logp_BT, entropy_from_logits(z_BTV, 1.0)
