"""Token log-probs and entropies straight from hidden states and the LM head, chunk by chunk.

The dense path (`lm_logits` then `policy_token_logprobs`) holds the float32 logits of every
token at once, and autodiff keeps them (or their softmax) for the backward: at a 128k
vocabulary that is 0.5 MB per token, 16 GiB for 32 rows of 1k tokens. Here the positions are
cut into chunks (every row in each) and a `lax.map` computes one chunk's logits, its
log-probs and entropies, and drops the logits; the `custom_vjp` backward recomputes each
chunk's logits and turns them into the gradients of the hidden states and the head (a
`lax.scan` that sums the head's gradient over chunks). Neither pass holds more than one
chunk's `[B, chunk, V]` logits, at the price of one more head matmul in the backward.

Each chunk's log-probs and entropies are those of `policy_token_logprobs` on that chunk's
logits (same conventions: temperature, the support K under top-k / top-p or as recorded by
the sampler, the token always in K). The gradient, with `z = logits / temperature`, `q` the
distribution over K, `H` its entropy:

  d log q(y) / d z_v = [v = y] - q_v
  d H / d z_v        = -q_v (log q_v + H)            (0 outside K)

and d / d logits = (d / d z) / temperature.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops.logprobs import (
    divides,
    kept_scaled_logits,
    policy_token_logprobs,
    truncates,
)


class ChunkSpec(NamedTuple):
    """The static choices of a chunked call (hashable: a `nondiff_argnums` argument)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    compute_dtype: jnp.dtype  # the head matmul's input dtype (its output is float32)


class TokenStats(NamedTuple):
    """Per token [B, T]: log-prob of the token, entropy of its distribution, logits' argmax."""

    logprobs: jax.Array
    entropy: jax.Array
    argmax: jax.Array


def _logits(h_BCD: jax.Array, head_DV: jax.Array, spec: ChunkSpec) -> jax.Array:
    """One chunk's logits [B, C, V], float32 whatever the compute dtype (as `lm_logits`:
    one 2-D matmul over the flattened rows)."""
    cd = spec.compute_dtype
    b, c, d = h_BCD.shape
    logits = jnp.dot(
        h_BCD.reshape(b * c, d).astype(cd), head_DV.astype(cd), preferred_element_type=jnp.float32
    )
    return logits.reshape(b, c, -1)


def _chunk_stats(spec: ChunkSpec, head_DV, h_BCD, tokens_BC, support_BCW):
    logits_BCV = _logits(h_BCD, head_DV, spec)
    logp, entropy = policy_token_logprobs(
        logits_BCV, tokens_BC, spec.temperature, spec.top_k, spec.top_p, support_BCW
    )
    return logp, entropy, jnp.argmax(logits_BCV, axis=-1).astype(jnp.int32)


def _split(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...]: chunks along the positions, every row in each
    (a batch-sharded array stays sharded by rows inside every chunk)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _join(x: jax.Array) -> jax.Array:
    """The inverse of `_split`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _inputs(chunk: int, h_BTD, tokens_BT, support_BTW) -> tuple:
    support = None if support_BTW is None else _split(support_BTW, chunk)
    return _split(h_BTD, chunk), _split(tokens_BT, chunk), support


def _forward(spec: ChunkSpec, chunk: int, h_BTD, head_DV, tokens_BT, support_BTW) -> TokenStats:
    xs = _inputs(chunk, h_BTD, tokens_BT, support_BTW)
    out = jax.lax.map(lambda x: _chunk_stats(spec, head_DV, *x), xs)
    return TokenStats(*(_join(o) for o in out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stats(spec: ChunkSpec, chunk: int, h_BTD, head_DV, tokens_BT, support_BTW) -> TokenStats:
    return _forward(spec, chunk, h_BTD, head_DV, tokens_BT, support_BTW)


def _stats_fwd(spec, chunk, h_BTD, head_DV, tokens_BT, support_BTW):
    out = _forward(spec, chunk, h_BTD, head_DV, tokens_BT, support_BTW)
    return out, (h_BTD, head_DV, tokens_BT, support_BTW, out.entropy)


def _stats_bwd(spec, chunk, residuals, cotangents):
    h_BTD, head_DV, tokens_BT, support_BTW, entropy_BT = residuals
    g_logp_BT, g_entropy_BT = cotangents.logprobs, cotangents.entropy  # argmax: no gradient
    cd = spec.compute_dtype
    head = head_DV.astype(cd)
    truncated = support_BTW is not None or truncates(spec.top_k, spec.top_p, head_DV.shape[1])

    def one(d_head_DV, x):
        h_BCD, tokens_BC, support_BCW, g_logp_BC, g_ent_BC, ent_BC = x
        logits_BCV = _logits(h_BCD, head_DV, spec)
        z_BCV, keep_BCV = kept_scaled_logits(
            logits_BCV, tokens_BC, spec.temperature, spec.top_k, spec.top_p, support_BCW
        )
        logq_BCV = z_BCV - jax.nn.logsumexp(z_BCV, axis=-1, keepdims=True)
        q_BCV = jnp.exp(logq_BCV)
        vocab = jax.lax.broadcasted_iota(jnp.int32, z_BCV.shape, 2)
        onehot_BCV = (vocab == tokens_BC[..., None].astype(jnp.int32)).astype(z_BCV.dtype)
        d_ent_BCV = q_BCV * (logq_BCV + ent_BC[..., None])
        if truncated:  # outside K, q = 0 but log q is huge: keep the product exactly 0
            d_ent_BCV = jnp.where(keep_BCV, d_ent_BCV, 0.0)
        d_BCV = g_logp_BC[..., None] * (onehot_BCV - q_BCV) - g_ent_BC[..., None] * d_ent_BCV
        if divides(spec.temperature):
            d_BCV = d_BCV / spec.temperature
        b, c, v = d_BCV.shape
        d_RV = d_BCV.reshape(b * c, v).astype(cd)
        h_RD = h_BCD.reshape(b * c, -1).astype(cd)
        d_h_RD = jnp.dot(d_RV, head.T, preferred_element_type=jnp.float32)
        d_head_DV = d_head_DV + jnp.dot(h_RD.T, d_RV, preferred_element_type=jnp.float32)
        return d_head_DV, d_h_RD.astype(h_BCD.dtype).reshape(h_BCD.shape)

    grads = tuple(a.astype(jnp.float32) for a in (g_logp_BT, g_entropy_BT, entropy_BT))
    xs = _inputs(chunk, h_BTD, tokens_BT, support_BTW) + tuple(_split(a, chunk) for a in grads)
    d_head_DV, d_h = jax.lax.scan(one, jnp.zeros(head_DV.shape, jnp.float32), xs)
    return _join(d_h), d_head_DV.astype(head_DV.dtype), None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def chunked_token_stats(
    h_BTD: jax.Array,
    head_DV: jax.Array,
    tokens_BT: jax.Array,
    chunk: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    support_BTW: jax.Array | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
) -> TokenStats:
    """`TokenStats` [B, T] of `tokens_BT` under the logits `h_BTD @ head_DV` (float32, from
    `compute_dtype` inputs), as `policy_token_logprobs` computes them from the whole logits
    (same arguments, same conventions), plus each position's argmax; `chunk` positions of
    every row at a time (the last chunk padded). Differentiable in `h_BTD` and `head_DV`; the
    temperature must be a Python number.
    """
    t = h_BTD.shape[1]
    chunk = max(1, min(chunk, t))
    pad = -t % chunk
    if pad:  # padded positions score token 0 with an empty support: finite values, cut below
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        tokens_BT = jnp.pad(tokens_BT, ((0, 0), (0, pad)))
        if support_BTW is not None:
            support_BTW = jnp.pad(support_BTW, ((0, 0), (0, pad), (0, 0)))
    spec = ChunkSpec(float(temperature), top_k, top_p, jnp.dtype(compute_dtype))
    out = _stats(spec, chunk, h_BTD, head_DV, tokens_BT.astype(jnp.int32), support_BTW)
    return TokenStats(*(o[:, :t] for o in out))
