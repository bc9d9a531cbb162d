"""KL estimators, the per-token RLHF reward, and the adaptive KL controller."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.errors import RlhfJaxError


def _k1(log_ratio: jax.Array) -> jax.Array:
    return log_ratio


def _k2(log_ratio: jax.Array) -> jax.Array:
    return 0.5 * jnp.square(log_ratio)


def _k3(log_ratio: jax.Array) -> jax.Array:
    # With s = log(ref / pi) = -log_ratio: exp(s) - 1 - s >= 0, unbiased for KL(pi || ref).
    s = -log_ratio
    return jnp.expm1(s) - s


def _abs(log_ratio: jax.Array) -> jax.Array:
    return jnp.abs(log_ratio)


KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "abs": _abs,
}


def kl_estimate(
    logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    kind: str = "k1",
    mask_BT: jax.Array | None = None,
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020), with `d = log pi(y_t) - log pi_ref(y_t)`:

      k1:  d                         (unbiased, can be negative; InstructGPT's penalty)
      k2:  d^2 / 2                   (biased, low variance)
      k3:  exp(-d) - 1 + d           (unbiased, non-negative)
      abs: |d|

    With `mask_BT`, d is set to 0 on masked positions *before* the estimator, so every
    estimator is exactly 0 there and whatever those positions hold (a huge or non-finite
    log-prob) reaches neither the value nor the gradient. Zeroing the estimate afterwards
    (`where(mask, k3(d), 0)`) is not enough: the forward is finite, but the backward
    multiplies the zero cotangent by k3's infinite derivative and gives NaN.
    """
    if kind not in KL_ESTIMATORS:
        raise RlhfJaxError(
            f"unknown KL estimator {kind!r}; available: {', '.join(sorted(KL_ESTIMATORS))}"
        )
    d_BT = logp_BT - ref_logp_BT
    if mask_BT is not None:
        d_BT = jnp.where(jnp.asarray(mask_BT) != 0, d_BT, 0.0)
    return KL_ESTIMATORS[kind](d_BT)


def last_token_onehot(mask_BT: jax.Array) -> jax.Array:
    """[B, T] with a 1 at the last position where mask is nonzero; an all-zero row stays 0."""
    real_BT = jnp.asarray(mask_BT) != 0
    t = real_BT.shape[-1]
    last_B = t - 1 - jnp.argmax(real_BT[:, ::-1], axis=-1)
    onehot_BT = jax.nn.one_hot(last_B, t, dtype=jnp.float32)
    return onehot_BT * jnp.any(real_BT, axis=-1, keepdims=True)


def per_token_rewards(
    score_B: jax.Array,
    logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    mask_BT: jax.Array,
    beta: float | jax.Array,
    kl_kind: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    """InstructGPT's reward `R(x, y) = r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x))`, per token.

    `reward_t = -beta * KL_t` on every response token, plus the reward-model score on the last
    real token of each row (Ziegler et al. 2019 placement). Zeros on masked positions.
    Returns `(rewards_BT, kl_BT)`, both float32, kl_BT masked.
    """
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    real_BT = mask_BT != 0
    kl_BT = kl_estimate(logp_BT, ref_logp_BT, kl_kind, mask_BT).astype(jnp.float32)
    score_B = jnp.asarray(score_B, jnp.float32)
    rewards_BT = -beta * kl_BT + score_B[:, None] * last_token_onehot(mask_BT)
    return jnp.where(real_BT, rewards_BT, 0.0), kl_BT


class AdaptiveKLState(NamedTuple):
    """The KL coefficient as training state (it changes, so it is not config)."""

    beta: jax.Array  # scalar


def adaptive_kl_update(
    beta: jax.Array,
    observed_kl: jax.Array,
    n_steps: int | jax.Array,
    target: float,
    horizon: float,
) -> jax.Array:
    """Proportional controller of Ziegler et al. 2019 (lm-human-preferences `AdaptiveKLController`):

    `e = clip(KL / KL_target - 1, -0.2, 0.2)`, `beta <- beta * (1 + e * n_steps / horizon)`.

    `observed_kl` is the mean per-sequence KL of the batch; `n_steps` the episodes it covers.
    Pure and jittable, so beta can live in compiled state.
    """
    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / horizon)
