"""Causal self-attention behind one contract, with the implementation chosen per backend.

Callers describe what each query may see with O(length) data, a `KeyMask`: which key slots
hold real tokens, the slot of the first query, and (packed rows) segment ids. Never a dense
[B, 1, T, S] mask: each implementation derives what it needs (the dense path builds the
matrix itself; the others never do).

Implementations (`ModelConfig.attention`, config `model.attention`):
  dense    `jax.nn.dot_product_attention` (XLA) over a [B, 1, T, S] mask: f32 scores
           [B, H, T, S], quadratic memory. What every version before this one ran.
  blocked  online softmax over key blocks (`attention_blocked.py`), memory linear in length,
           a recomputing backward. Any backend.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` (GPU): causal with
           per-row lengths. cuDNN's lengths mean right padding, so each row is rotated to
           start at its first real token; a row whose real tokens are not one contiguous span
           (or packed rows, which cuDNN's public API cannot express) falls back to `blocked`.
  splash   Pallas splash attention (TPU), segment ids covering padding and packing.
  auto     cudnn on GPU where its constraints hold, splash on TPU, else blocked; on every
           backend `dense` while the key length is below `DENSE_BELOW` (measured in
           docs/memory.md: there dense is as fast and its scores are small), which keeps
           short runs, the quickstart included, bitwise what they were.

With a KV cache (`cached_attention`) the keys attended are only a power-of-two bucket of
slots >= the last query's slot, chosen per step by `lax.switch` between one compiled branch
per bucket, so a decode step costs what the filled part of the cache costs, not what was
allocated.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.attention_blocked import blocked_attention

# `auto` keeps the dense path below this many key slots (see docs/memory.md for the
# measurement): the quickstart's sequences are far shorter, so its numbers do not change.
DENSE_BELOW = 1024
# Smallest bucket of cache slots attended with a KV cache: caches this size or smaller run
# exactly the code they ran before buckets existed.
MIN_BUCKET = 256
BLOCK = 512


class KeyMask(NamedTuple):
    """What each query may see. Query t sits at slot `q_start + t` and sees key slot s when
    s <= q_start + t, `kv_valid_BS[:, s]` is nonzero, and, for packed rows, query and key
    carry the same segment id.

    kv_valid_BS:  [B, S] 1 where a key slot holds a real token.
    q_start:      scalar slot of query 0 (0 without a cache; the cache index with one).
    segment_ids_BT: [B, T] packed sequences 1, 2, ... (0 padding), or None; only without
                  a cache (queries and keys are then the same T slots).
    """

    kv_valid_BS: jax.Array
    q_start: jax.Array | int = 0
    segment_ids_BT: jax.Array | None = None


def dense_mask(mask: KeyMask, t: int) -> jax.Array:
    """The [B, 1, T, S] boolean matrix the dense path reads (built here, never by callers)."""
    s = mask.kv_valid_BS.shape[-1]
    q_slot = mask.q_start + jnp.arange(t)
    visible = jnp.arange(s)[None, :] <= q_slot[:, None]
    dense = visible[None, None] & (mask.kv_valid_BS[:, None, None, :] > 0)
    if mask.segment_ids_BT is not None:
        seg = mask.segment_ids_BT
        dense = dense & (seg[:, :, None] == seg[:, None, :])[:, None]
    return dense


def dense_cache_attention(
    q_BTHE: jax.Array, k_BKSE: jax.Array, v_BKSE: jax.Array, mask_B1TS: jax.Array
) -> jax.Array:
    """Softmax attention of T queries over a KV cache in its [B, K, S, E] layout.

    The same math as `jax.nn.dot_product_attention` (scores and softmax in float32, masked
    scores set to the float32 minimum, 1/sqrt(E) scaling, query head h reading kv head
    h // G), written so that neither the cache nor its slots are copied or transposed: the
    only large operands are read in place by the two batched matmuls.
    """
    b, t, h, e = q_BTHE.shape
    kv = k_BKSE.shape[1]
    q_BKGTE = q_BTHE.reshape(b, t, kv, h // kv, e).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum(
        "bkgte,bkse->bkgts", q_BKGTE, k_BKSE, preferred_element_type=jnp.float32
    ) * jnp.float32(1.0 / np.sqrt(e))
    scores = jnp.where(mask_B1TS[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSE.dtype)
    out_BKGTE = jnp.einsum("bkgts,bkse->bkgte", probs, v_BKSE)
    out_BTHE = out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)
    # Materialise [B, T, H, E] here: otherwise XLA folds this (small) transpose into the
    # output projection by transposing its (large) weight instead, at every decode step.
    return jax.lax.optimization_barrier(out_BTHE)


def _platform() -> str:
    return jax.devices()[0].platform


def _cudnn_fits(dtype, head_dim: int) -> bool:
    """jax 0.10.2's cuDNN flash attention (`_src/cudnn/fused_attention_stablehlo.py`,
    `check_layout` / `check_is_flash_attention`): fp16 or bf16 operands, head dim a multiple
    of 8 and at most 128 (256 on Hopper; 128 holds on every GPU)."""
    return jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def resolve(kind: str, dtype, head_dim: int, length: int, packed: bool) -> str:
    """The implementation `kind` means for these operands on this backend."""
    if kind != "auto":
        return kind
    if length < DENSE_BELOW:
        return "dense"
    platform = _platform()
    if platform == "gpu" and _cudnn_fits(dtype, head_dim):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "blocked"


def _grouped(q_BTHE: jax.Array, kv_heads: int) -> jax.Array:
    b, t, h, e = q_BTHE.shape
    return q_BTHE.reshape(b, t, kv_heads, h // kv_heads, e)


def self_attention(
    q_BTHE: jax.Array,
    k_BTKE: jax.Array,
    v_BTKE: jax.Array,
    mask: KeyMask,
    kind: str = "auto",
) -> jax.Array:
    """Causal self-attention without a cache: [B, T, H, E] out, query head h reading kv head
    h // (H / K)."""
    b, t, h, e = q_BTHE.shape
    packed = mask.segment_ids_BT is not None
    impl = resolve(kind, q_BTHE.dtype, e, t, packed)
    if impl == "dense":
        return jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, mask=dense_mask(mask, t))
    if impl == "cudnn":
        from rlhf_jax.models.attention_cudnn import cudnn_attention

        return cudnn_attention(q_BTHE, k_BTKE, v_BTKE, mask)
    if impl == "splash":
        from rlhf_jax.models.attention_splash import splash_attention

        return splash_attention(q_BTHE, k_BTKE, v_BTKE, mask)
    return blocked_self_attention(q_BTHE, k_BTKE, v_BTKE, mask)


def blocked_self_attention(q_BTHE, k_BTKE, v_BTKE, mask: KeyMask, block: int = BLOCK):
    """`self_attention` through the blocked path (also cuDNN's fallback)."""
    b, t, h, e = q_BTHE.shape
    seg = mask.segment_ids_BT
    out = blocked_attention(
        _grouped(q_BTHE, k_BTKE.shape[2]),
        k_BTKE.transpose(0, 2, 1, 3),
        v_BTKE.transpose(0, 2, 1, 3),
        mask.kv_valid_BS,
        mask.q_start,
        None if seg is None else (seg, seg),
        block,
    )
    return out.reshape(b, t, h, e)


def buckets(slots: int) -> tuple[int, ...]:
    """Key-slot counts a cached attention may read: powers of two from MIN_BUCKET, then all."""
    sizes = [MIN_BUCKET]
    while sizes[-1] < slots:
        sizes.append(sizes[-1] * 2)
    return tuple(min(n, slots) for n in sizes if n < slots) + (slots,)


def cached_attention(
    q_BTHE: jax.Array,
    k_BKSE: jax.Array,
    v_BKSE: jax.Array,
    mask: KeyMask,
    kind: str = "auto",
    layer: jax.Array | None = None,
) -> jax.Array:
    """Attention of T queries at slots [q_start, q_start + T) over a KV cache [B, K, S, E]
    (or, with `layer`, layer `layer` of a stacked cache [L, B, K, S, E]).

    Only the first `bucket` slots are read, the smallest bucket holding q_start + T: later
    slots are invisible to every query (causality), so the result is that of all S slots.
    """
    t = q_BTHE.shape[1]
    sizes = buckets(k_BKSE.shape[-2])
    filled = mask.q_start + t

    def read(x: jax.Array, n: int) -> jax.Array:
        if layer is None:
            return x[:, :, :n]
        # One dynamic slice: the layer's first n slots, never the layer's whole cache first.
        _, b, kv, _, e = x.shape
        return jax.lax.dynamic_slice(x, (layer, 0, 0, 0, 0), (1, b, kv, n, e))[0]

    def over(n: int):
        def branch(q, k, v, kv_valid):
            part = KeyMask(kv_valid[:, :n], mask.q_start)
            k, v = read(k, n), read(v, n)
            # A prefill over many slots takes the blocked path (no [T, S] scores); a decode
            # step (T = 1) holds one row of scores, which the dense einsums do fastest.
            if t > 1 and resolve(kind, q.dtype, q.shape[-1], n, False) != "dense":
                b, _, h, e = q.shape
                out = blocked_attention(
                    _grouped(q, k.shape[1]), k, v, part.kv_valid_BS, part.q_start, None, BLOCK
                )
                return out.reshape(b, t, h, e)
            return dense_cache_attention(q, k, v, dense_mask(part, t))

        return branch

    operands = (q_BTHE, k_BKSE, v_BKSE, mask.kv_valid_BS)
    if len(sizes) == 1:
        return over(sizes[0])(*operands)
    index = jnp.sum(jnp.asarray(np.array(sizes[:-1])) < filled).astype(jnp.int32)
    return jax.lax.switch(index, [over(n) for n in sizes], *operands)
