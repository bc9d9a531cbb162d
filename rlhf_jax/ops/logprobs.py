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
import numpy as np

# Below float32's smallest normal number a temperature cannot divide (XLA flushes it to 0).
GREEDY_BELOW = float(np.finfo(np.float32).tiny)


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` samples greedily: 0, or a positive value below float32's
    smallest normal number (1.2e-38), which float32 cannot divide by. Every other temperature
    samples from its distribution; for a tiny one that is the greedy token too (log-prob 0)."""
    return temperature < GREEDY_BELOW


def divides(temperature: float) -> bool:
    """Whether log-probs at `temperature` divide the logits by it: not at 1 (nothing to do)
    and not at a greedy temperature, whose tokens are scored at temperature 1 as the sampler
    scores them (`rollout.sampling.sample_token`). A traced temperature always divides."""
    if isinstance(temperature, int | float):
        return temperature != 1.0 and not is_greedy(temperature)
    return True


def _scaled(logits_BTV: jax.Array, temperature: float) -> jax.Array:
    logits_BTV = logits_BTV.astype(jnp.promote_types(logits_BTV.dtype, jnp.float32))
    # Skipping the division at T = 1 keeps the common path free of one elementwise pass.
    if not divides(temperature):
        return logits_BTV
    # Shifted by each row's maximum before the division, as the sampler does
    # (`rollout.sampling._tempered`): at a small temperature logits / T are huge (1e13 at
    # T = 1e-12), and a log-prob taken as their difference with logsumexp loses every digit.
    # The shift changes no log-prob or gradient (softmax is shift-invariant), and makes the
    # trainer's formula the sampler's, so their log-probs agree at any temperature.
    row_max_BT1 = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1, keepdims=True))
    return (logits_BTV - row_max_BT1) / temperature


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
    if divides(temperature):
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


def truncates(top_k: int | None, top_p: float | None, vocab_size: int) -> bool:
    """Whether top-k / top-p remove any token of a `vocab_size` vocabulary."""
    return (top_k is not None and top_k < vocab_size) or (top_p is not None and top_p < 1.0)


def kept_tokens(logits_BV: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """bool [..., V]: the tokens `filter_logits` keeps (the support of the sampling step)."""
    v = logits_BV.shape[-1]
    kept = filter_logits(logits_BV.reshape(-1, v), top_k, top_p)
    return (kept > jnp.finfo(kept.dtype).min).reshape(logits_BV.shape)


_WORD = 32  # tokens per uint32 word of a packed support


def support_width(vocab_size: int) -> int:
    """uint32 words per token of a packed support: ceil(V / 32)."""
    return -(-vocab_size // _WORD)


def pack_support(keep_BTV: jax.Array) -> jax.Array:
    """bool [..., V] -> uint32 [..., ceil(V / 32)]: token v is bit v % 32 of word v // 32.

    A recorded support costs V / 8 bytes per token (1/32 of its float32 logits)."""
    v = keep_BTV.shape[-1]
    w = support_width(v)
    pad = [(0, 0)] * (keep_BTV.ndim - 1) + [(0, w * _WORD - v)]
    bits = jnp.pad(keep_BTV, pad).reshape(*keep_BTV.shape[:-1], w, _WORD).astype(jnp.uint32)
    shifts = jnp.arange(_WORD, dtype=jnp.uint32)
    return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)  # distinct bits: sum == or


def unpack_support(words_BTW: jax.Array, vocab_size: int) -> jax.Array:
    """uint32 [..., W] -> bool [..., vocab_size], the inverse of `pack_support`."""
    shifts = jnp.arange(_WORD, dtype=jnp.uint32)
    bits = (words_BTW[..., None] >> shifts) & jnp.uint32(1)
    return bits.reshape(*words_BTW.shape[:-1], -1)[..., :vocab_size] != 0


def kept_scaled_logits(
    logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    support_BTW: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """`(z, keep)`: `z = logits / temperature` with every token outside the support K (and not
    the token itself) set to the dtype's lowest finite value, and `keep` [B, T, V] bool that
    support (see `policy_token_logprobs`, which this serves with `ops.chunked_logprobs`)."""
    v = logits_BTV.shape[-1]
    z_BTV = _scaled(logits_BTV, temperature)
    if support_BTW is None:
        keep_BTV = kept_tokens(jax.lax.stop_gradient(z_BTV), top_k, top_p)
    else:
        keep_BTV = unpack_support(support_BTW, v)
    vocab = jax.lax.broadcasted_iota(jnp.int32, z_BTV.shape, z_BTV.ndim - 1)
    keep_BTV = keep_BTV | (vocab == tokens_BT[..., None].astype(jnp.int32))
    # Sanitised before the exp: a dropped token's logit becomes the dtype's lowest finite
    # value (probability exactly 0, gradient exactly 0), never -inf.
    return jnp.where(keep_BTV, z_BTV, jnp.finfo(z_BTV.dtype).min), keep_BTV


def policy_token_logprobs(
    logits_BTV: jax.Array,
    tokens_BT: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    support_BTW: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs [B, T] and entropies [B, T] of tokens under the distribution they were
    sampled from: `z = logits / temperature` renormalised over the sampling step's support K,

      `log q(y_t) = z_t[y_t] - logsumexp_{v in K_t u {y_t}} z_t[v]`

    (docs/algorithms.md, "Log-probs under top-k / top-p"). `support_BTW` is K as recorded by
    the sampler (`pack_support`); the trainer and the reference always pass it, so every
    log-prob of a rollout, whatever the weights, is over the same tokens. Without it, K is
    taken from these logits with `top_k` / `top_p` (what the sampler does at each step); with
    neither, K is the whole vocabulary and this is `token_logprobs` (its fused gradient).

    The token itself is always in K: a real token was drawn from K, and a padded position's
    token (outside it) then gets a finite log-prob rather than -inf, so nothing downstream
    (a KL, a ratio) overflows in the forward or the backward pass. K carries no gradient.
    """
    v = logits_BTV.shape[-1]
    if support_BTW is None and not truncates(top_k, top_p, v):
        return (
            token_logprobs(logits_BTV, tokens_BT, temperature),
            entropy_from_logits(logits_BTV, temperature),
        )
    z_BTV, keep_BTV = kept_scaled_logits(
        logits_BTV, tokens_BT, temperature, top_k, top_p, support_BTW
    )
    logp_BT, lse_BT = _plain_token_logprobs(z_BTV, tokens_BT, 1.0)
    p_BTV = jnp.exp(z_BTV - lse_BT[..., None])
    entropy_BT = lse_BT - jnp.sum(p_BTV * jnp.where(keep_BTV, z_BTV, 0.0), axis=-1)
    return logp_BT, entropy_BT
