"""Pallas splash attention (TPU): causal, with padding and packing as segment ids.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) takes one causal mask for
the whole batch plus per-row segment ids: a query sees a key when the mask allows it and both
carry the same id. Padding gets id 0 and real tokens their segment (1 for an unpacked row), so
a real query never sees padding and sequences packed in a row never see each other. A padding
query sees earlier padding and itself, never an empty row (which the kernel forbids: its
softmax would divide by zero); what it computes is padding nothing reads.

Grouped-query attention runs the multi-query kernel once per kv head (its G query heads
share that head's keys and values). The kernel does not scale the scores: q is multiplied by
1/sqrt(E) first. The length is padded to a multiple of the block with id-0 slots at the end,
which no real query reaches (causality).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from rlhf_jax.models.attention import KeyMask

BLOCK = 512


@functools.lru_cache(maxsize=32)
def _kernel(length: int, heads: int, block: int, interpret: bool):
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(
    q_BTHE: jax.Array,
    k_BTKE: jax.Array,
    v_BTKE: jax.Array,
    mask: KeyMask,
    interpret: bool = False,
) -> jax.Array:
    """`self_attention` through the splash kernel; `interpret=True` runs it on CPU (tests)."""
    b, t, h, e = q_BTHE.shape
    kv = k_BTKE.shape[2]
    block = min(BLOCK, -(-t // 128) * 128)
    pad = -t % block
    valid = mask.kv_valid_BS > 0
    seg = mask.segment_ids_BT if mask.segment_ids_BT is not None else jnp.ones_like(valid)
    seg_BT = jnp.where(valid, seg.astype(jnp.int32), 0)
    q = q_BTHE * jnp.asarray(1.0 / np.sqrt(e), q_BTHE.dtype)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k_BTKE, v_BTKE))
        seg_BT = jnp.pad(seg_BT, ((0, 0), (0, pad)))
    else:
        k, v = k_BTKE, v_BTKE
    n = t + pad
    kernel = _kernel(n, h // kv, block, interpret)
    q_BKGTE = q.reshape(b, n, kv, h // kv, e).transpose(0, 2, 3, 1, 4)
    k_BKTE, v_BKTE = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(q_KGTE, k_KTE, v_KTE, seg_T):
        ids = splash.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=ids))(
            q_KGTE, k_KTE, v_KTE
        )

    out_BKGTE = jax.vmap(one_row)(q_BKGTE, k_BKTE, v_BKTE, seg_BT)
    return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(b, n, h, e)[:, :t]
