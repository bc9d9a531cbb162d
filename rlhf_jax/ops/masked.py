"""Masked reductions: the one place where padded entries are dropped from a statistic.

Every mean, variance and whitening in the package goes through these helpers so that the
denominator of each statistic is stated once, here: the number of real entries (sum of the
mask), never the padded shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Axis = int | tuple[int, ...] | None


def _prepare(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Promote to at least float32 (bf16 sums lose digits) and broadcast the mask to x."""
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    x = jnp.asarray(x, dtype)
    mask = jnp.broadcast_to(jnp.asarray(mask, dtype), x.shape)
    return x, mask


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """`sum_i mask_i * x_i` over `axis` (all axes when None). No denominator.

    Entries where the mask is 0 contribute exactly 0 even when they hold inf or NaN (padding
    may carry garbage), so a padded position can never poison the sum.
    """
    x, mask = _prepare(x, mask)
    return jnp.sum(jnp.where(mask != 0, x * mask, 0.0), axis=axis)


def masked_mean(
    x: jax.Array, mask: jax.Array, axis: Axis = None, count: jax.Array | None = None
) -> jax.Array:
    """`sum_i mask_i x_i / sum_i mask_i` over `axis`.

    Denominator: the sum of the mask over `axis` (the number of real entries for a 0/1 mask),
    or `count` when given: the count of a whole batch of which `x` is one micro-batch, so that
    the micro-batches' results sum to the whole batch's mean (`losses.accumulation`).
    Where the denominator is 0 (everything masked) the result is 0, not NaN.
    """
    x, mask = _prepare(x, mask)
    total = masked_sum(x, mask, axis)
    count = jnp.sum(mask, axis=axis) if count is None else jnp.asarray(count, total.dtype)
    safe = jnp.where(count > 0, count, 1.0)
    return jnp.where(count > 0, total / safe, 0.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = False) -> jax.Array:
    """Variance of the masked entries of x, over all axes.

    `Var = sum_i m_i (x_i - mu)^2 / sum_i m_i` with `mu = masked_mean(x, m)` (biased, as in
    lm-human-preference-details' whitening). Denominator: the sum of the mask; with
    `unbiased=True` it is `sum(mask) - 1` (Bessel), for a 0/1 mask. 0 when fewer than one
    (biased) or two (unbiased) real entries.
    """
    x, mask = _prepare(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        count = jnp.sum(mask)
        var = jnp.where(count > 1, var * count / jnp.where(count > 1, count - 1, 1.0), 0.0)
    return var


def masked_whiten(
    x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """`(x - mu) / sqrt(Var + eps)` over the masked entries (mu, Var from `masked_mean` and the
    biased `masked_var`: denominator sum of the mask), as in "The N implementation details of
    RLHF with PPO" (Huang et al. 2024). With `shift_mean=False` the mean is added back, so only
    the scale changes (used for reward whitening). Masked entries of the output are 0.
    """
    x, mask = _prepare(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask != 0, whitened, 0.0)


# How per-token loss terms [B, T] become one scalar (see `reduce_tokens`).
REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def reduce_tokens(
    x_BT: jax.Array,
    mask_BT: jax.Array,
    reduction: str = "token_mean",
    token_count: jax.Array | float | None = None,
    sequence_count: jax.Array | float | None = None,
) -> jax.Array:
    """Per-token terms [B, T] -> a scalar, over the real tokens of each row.

      token_mean:              `sum_bt m x / token_count`
                               (DAPO: every token weighs the same)
      seq_mean_token_mean:     `sum_b (sum_t m x / len_b) / sequence_count`
                               (GRPO: every sequence weighs the same, whatever its length)
      seq_mean_token_sum_norm: `sum_bt m x / (sequence_count * T)`, T the padded length
                               (Dr. GRPO: a constant normaliser, so length biases nothing)

    Denominators: `token_count` defaults to the sum of the mask and `sequence_count` to B (the
    rows of x). Passing the counts of a whole batch instead (divided by the number of
    micro-batches) makes the mean of micro-batch losses exactly the whole batch's loss, also
    when micro-batches hold different numbers of tokens: a mean of per-micro-batch means is not.
    A row without real tokens contributes 0; a zero denominator gives 0, not NaN.
    """
    x_BT, mask_BT = _prepare(x_BT, mask_BT)
    if reduction == "token_mean":
        total = masked_sum(x_BT, mask_BT)
        count = jnp.sum(mask_BT) if token_count is None else jnp.asarray(token_count, x_BT.dtype)
    elif reduction in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        count = x_BT.shape[0] if sequence_count is None else sequence_count
        count = jnp.asarray(count, x_BT.dtype)
        if reduction == "seq_mean_token_mean":
            total = jnp.sum(masked_mean(x_BT, mask_BT, axis=1))
        else:
            total = masked_sum(x_BT, mask_BT)
            count = count * x_BT.shape[1]
    else:
        raise ValueError(f"unknown reduction {reduction!r}; one of {', '.join(REDUCTIONS)}")
    safe = jnp.where(count > 0, count, 1.0)
    return jnp.where(count > 0, total / safe, 0.0)
