"""Blocked causal attention: an online softmax over key blocks, memory linear in length.

The dense path holds f32 scores [B, H, T, S]; this one walks the keys in blocks of `block`
slots inside a `lax.fori_loop`, keeping per query a running max `m`, a running sum `l` and an
unnormalised output `acc` (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"; the FlashAttention recurrence, Dao et al. 2022, Alg. 1 with one query block). The
largest temporary is one block's scores [B, K, G, T, block].

The backward is a `jax.custom_vjp` that recomputes each block's probabilities from the saved
log-sum-exp (FlashAttention's backward, Alg. 2 of Dao et al. 2022): residuals are q, k, v, the
output and the log-sum-exp, all linear in length. Autodiff through the loop (even with a
`jax.checkpoint`ed body) would save the [B, K, G, T, E] accumulator of every block: T / block
copies of the output (measured in docs/memory.md).

Layout: q [B, T, K, G, E] (query heads grouped under their kv head), k and v [B, K, S, E]
(the KV cache's own layout, so a prefill reads the cache as it lies). Query t sits at slot
`q_start + t` and sees slot s when s <= q_start + t, `kv_valid[s]`, and (packed rows) the
same segment id.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_NEG = float(np.finfo(np.float32).min)


class _Running(NamedTuple):
    """The online softmax's state per query: running max, running sum of exp(s - max), and
    the output so far, unnormalised (f32)."""

    max_BKGT: jax.Array
    sum_BKGT: jax.Array
    acc_BKGTE: jax.Array


class _Grads(NamedTuple):
    dq: jax.Array
    dk: jax.Array
    dv: jax.Array


def _block_mask(kv_valid_BS, q_seg_BT, kv_seg_BS, q_start, t: int, j, block: int):
    """[B, 1, 1, T, block] boolean: which keys of block j each query may see."""
    q_slot = q_start + jnp.arange(t)
    kv_slot = j * block + jnp.arange(block)
    valid = jax.lax.dynamic_slice_in_dim(kv_valid_BS, j * block, block, axis=1) > 0
    allowed = (kv_slot[None, :] <= q_slot[:, None])[None] & valid[:, None, :]
    if q_seg_BT is not None:
        kv_seg = jax.lax.dynamic_slice_in_dim(kv_seg_BS, j * block, block, axis=1)
        allowed = allowed & (q_seg_BT[:, :, None] == kv_seg[:, None, :])
    return allowed[:, None, None]


def _kv_block(x_BKSE, j, block: int):
    return jax.lax.dynamic_slice_in_dim(x_BKSE, j * block, block, axis=2)


def _scores(q, k_blk, scale):
    s = jnp.einsum("btkge,bkse->bkgts", q, k_blk, preferred_element_type=jnp.float32)
    return s * jnp.float32(scale)


def _forward(q, k, v, kv_valid, q_seg, kv_seg, q_start, block):
    b, t, kh, g, e = q.shape
    scale = 1.0 / np.sqrt(e)
    n_blocks = k.shape[2] // block

    def body(j, run: _Running) -> _Running:
        allowed = _block_mask(kv_valid, q_seg, kv_seg, q_start, t, j, block)
        s = jnp.where(allowed, _scores(q, _kv_block(k, j, block), scale), _NEG)
        new_max = jnp.maximum(run.max_BKGT, s.max(-1))
        # where(), not exp(-inf): a row with nothing visible yet keeps p = 0 and max = _NEG.
        p = jnp.where(allowed, jnp.exp(s - new_max[..., None]), 0.0)
        corr = jnp.exp(run.max_BKGT - new_max)
        pv = jnp.einsum(
            "bkgts,bkse->bkgte", p.astype(v.dtype), _kv_block(v, j, block),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        total = run.sum_BKGT * corr + p.sum(-1)
        return _Running(new_max, total, run.acc_BKGTE * corr[..., None] + pv)

    init = _Running(
        jnp.full((b, kh, g, t), _NEG, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, e), jnp.float32),
    )
    run = jax.lax.fori_loop(0, n_blocks, body, init)
    seen = run.sum_BKGT > 0  # a query that sees no key (a padding query) outputs 0
    total = jnp.where(seen, run.sum_BKGT, 1.0)
    out = run.acc_BKGTE / total[..., None]
    lse = jnp.where(seen, run.max_BKGT + jnp.log(total), 0.0)
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _blocked(q, k, v, kv_valid, q_seg, kv_seg, q_start, block):
    return _forward(q, k, v, kv_valid, q_seg, kv_seg, q_start, block)[0]


def _blocked_fwd(q, k, v, kv_valid, q_seg, kv_seg, q_start, block):
    out, lse = _forward(q, k, v, kv_valid, q_seg, kv_seg, q_start, block)
    return out, (q, k, v, kv_valid, q_seg, kv_seg, q_start, out, lse)


def _blocked_bwd(block, res, d_out):
    q, k, v, kv_valid, q_seg, kv_seg, q_start, out, lse = res
    t, e = q.shape[1], q.shape[-1]
    scale = 1.0 / np.sqrt(e)
    # D_t = sum_e dO * O: the softmax backward's row term (dS = P * (dP - D)).
    d_out_BKGTE = d_out.transpose(0, 2, 3, 1, 4)
    delta = jnp.einsum(
        "bkgte,bkgte->bkgt", d_out_BKGTE.astype(jnp.float32),
        out.transpose(0, 2, 3, 1, 4).astype(jnp.float32),
    )  # fmt: skip

    def body(j, grads: _Grads) -> _Grads:
        k_blk, v_blk = _kv_block(k, j, block), _kv_block(v, j, block)
        allowed = _block_mask(kv_valid, q_seg, kv_seg, q_start, t, j, block)
        p = jnp.where(allowed, jnp.exp(_scores(q, k_blk, scale) - lse[..., None]), 0.0)
        dv_blk = jnp.einsum(
            "bkgts,bkgte->bkse", p.astype(d_out.dtype), d_out_BKGTE,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        dp = jnp.einsum("bkgte,bkse->bkgts", d_out_BKGTE, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * jnp.float32(scale)).astype(q.dtype)
        dq_blk = jnp.einsum("bkgts,bkse->btkge", ds, k_blk, preferred_element_type=jnp.float32)
        dk_blk = jnp.einsum("bkgts,btkge->bkse", ds, q, preferred_element_type=jnp.float32)
        return _Grads(
            grads.dq + dq_blk,
            jax.lax.dynamic_update_slice_in_dim(grads.dk, dk_blk, j * block, axis=2),
            jax.lax.dynamic_update_slice_in_dim(grads.dv, dv_blk, j * block, axis=2),
        )

    init = _Grads(
        jnp.zeros(q.shape, jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    dq, dk, dv = jax.lax.fori_loop(0, k.shape[2] // block, body, init)
    # Masks and offsets are integers: their cotangents are None (no gradient).
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(
    q_BTKGE: jax.Array,
    k_BKSE: jax.Array,
    v_BKSE: jax.Array,
    kv_valid_BS: jax.Array,
    q_start: jax.Array | int = 0,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    block: int = 512,
) -> jax.Array:
    """Causal attention of T queries at slots [q_start, q_start + T) over S key slots.

    Returns [B, T, K, G, E] in q's dtype; a query that sees no key returns 0 (the dense path
    returns the mean of all values there; both are padding that nothing reads). `segment_ids`
    is `(q_seg [B, T], kv_seg [B, S])` for packed rows. S need not be a multiple of `block`:
    keys are padded with invalid slots.
    """
    s = k_BKSE.shape[2]
    block = min(block, s)
    pad = -s % block
    kv_valid = kv_valid_BS.astype(jnp.int32)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = (x.astype(jnp.int32) for x in segment_ids)
    if pad:
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        k_BKSE, v_BKSE = jnp.pad(k_BKSE, widths), jnp.pad(v_BKSE, widths)
        kv_valid = jnp.pad(kv_valid, ((0, 0), (0, pad)))
        if kv_seg is not None:
            kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    q_start = jnp.asarray(q_start, jnp.int32)
    return _blocked(q_BTKGE, k_BKSE, v_BKSE, kv_valid, q_seg, kv_seg, q_start, block)
