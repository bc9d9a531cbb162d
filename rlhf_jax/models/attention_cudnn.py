"""cuDNN flash attention for rows whose real tokens form one contiguous span.

`jax.nn.dot_product_attention(implementation="cudnn")` in jax 0.10.2 expresses padding only
as per-row lengths (`query_seq_lengths`, `key_value_seq_lengths`: the first n tokens are
real) combined with `is_causal`; a boolean mask would be turned into an additive bias, and
packed (segment) layouts are not exposed. A row with left padding, or with padding on both
ends (a left-padded prompt followed by a response that stopped early), is rotated so that
its first real token comes first: causality between real tokens is unchanged (both slots
shift by the same amount), the padding lands at the end where the lengths mask it, and the
output is rotated back. Rows with holes cannot be expressed this way; a runtime check sends
such a batch to the blocked path instead (`lax.cond`: only one branch runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.attention import KeyMask, blocked_self_attention

# The rotated rows are padded at their end to a multiple of this. jax's cuDNN wrapper (0.10
# and 0.11) refuses an odd length under differentiation: it applies its "a bias needs an
# even length" check with the empty placeholder it passes when there is no bias, so a
# 1,025-token reward-model row failed on an H200 (bench/accelerator.py, row 10). The lengths
# mask the added slots, so they change nothing but the work (at most ALIGN - 1 tokens).
ALIGN = 8


def _rotate(x_BT_: jax.Array, shift_B: jax.Array) -> jax.Array:
    """Row b of x read from slot (t + shift_b) mod T: each row rolled left by its shift."""
    t = x_BT_.shape[1]
    index_BT = (jnp.arange(t)[None, :] + shift_B[:, None]) % t
    return jnp.take_along_axis(x_BT_, index_BT.reshape(*index_BT.shape, 1, 1), axis=1)


def contiguous_rows(kv_valid_BS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(first real slot [B], real tokens [B], whether every row's real tokens are one span)."""
    valid = kv_valid_BS > 0
    s = valid.shape[1]
    start = jnp.argmax(valid, axis=1).astype(jnp.int32)
    length = valid.sum(axis=1).astype(jnp.int32)
    last = s - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    one_span = jnp.all((length == 0) | (last - start + 1 == length))
    return start, length, one_span


def rotated_attention(
    q_BTHE: jax.Array,
    k_BTKE: jax.Array,
    v_BTKE: jax.Array,
    start_B: jax.Array,
    length_B: jax.Array,
    implementation: str | None,
) -> jax.Array:
    """Causal attention with each row's real span [start, start + length) moved to the front
    and masked by lengths; `implementation=None` (XLA) is how the CPU tests check it."""
    t = q_BTHE.shape[1]
    pad = ((0, 0), (0, -t % ALIGN), (0, 0), (0, 0))

    def front(x_BT_: jax.Array) -> jax.Array:
        return jnp.pad(_rotate(x_BT_, start_B), pad)

    # A row with no real token keeps length 0 for the keys; cuDNN needs >= 1 query.
    lengths = jnp.maximum(length_B, 1)
    out = jax.nn.dot_product_attention(
        front(q_BTHE),
        front(k_BTKE),
        front(v_BTKE),
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return _rotate(out[:, :t], (t - start_B) % t)


def cudnn_attention(q_BTHE, k_BTKE, v_BTKE, mask: KeyMask) -> jax.Array:
    """`self_attention` on cuDNN; packed rows and rows with holes take the blocked path."""
    if mask.segment_ids_BT is not None:
        return blocked_self_attention(q_BTHE, k_BTKE, v_BTKE, mask)
    start, length, one_span = contiguous_rows(mask.kv_valid_BS)
    return jax.lax.cond(
        one_span,
        lambda: rotated_attention(q_BTHE, k_BTKE, v_BTKE, start, length, "cudnn"),
        lambda: blocked_self_attention(q_BTHE, k_BTKE, v_BTKE, mask),
    )
