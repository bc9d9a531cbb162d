"""Returns over a response as reverse `lax.scan`s over time: generalised advantage estimation
(Schulman et al. 2016) and the plain discounted reward-to-go."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class _GAECarry(NamedTuple):
    """What step t needs from step t + 1; both are 0 past the last real token (episode over)."""

    next_value_B: jax.Array
    next_advantage_B: jax.Array


def gae_advantages(
    rewards_BT: jax.Array,
    values_BT: jax.Array,
    mask_BT: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and returns over a response.

    `delta_t = r_t + gamma * V_{t+1} - V_t`,
    `A_t = delta_t + gamma * lam * A_{t+1}`,
    `R_t = A_t + V_t` (the value target).

    mask_BT is a prefix of ones per row (rows end at different lengths). The episode ends after
    the last real token, so `V_{t+1} = 0` and `A_{t+1} = 0` there: the value of a padded position
    is never bootstrapped from. Advantages and returns are 0 on masked positions.
    Returns `(advantages_BT, returns_BT)` in float32 (or wider).
    """
    dtype = jnp.promote_types(jnp.result_type(rewards_BT, values_BT), jnp.float32)
    mask_BT = jnp.asarray(mask_BT, dtype)
    # Zero padding first so garbage there (inf, NaN) cannot reach the carry.
    rewards_BT = jnp.where(mask_BT != 0, jnp.asarray(rewards_BT, dtype), 0.0)
    values_BT = jnp.where(mask_BT != 0, jnp.asarray(values_BT, dtype), 0.0)

    def step(carry: _GAECarry, xs: tuple[jax.Array, jax.Array, jax.Array]):
        reward_B, value_B, mask_B = xs
        delta_B = reward_B + gamma * carry.next_value_B - value_B
        advantage_B = (delta_B + gamma * lam * carry.next_advantage_B) * mask_B
        # A masked step hands zeros to its predecessor: the episode ended before it.
        return _GAECarry(value_B * mask_B, advantage_B), advantage_B

    b = rewards_BT.shape[0]
    init = _GAECarry(jnp.zeros((b,), dtype), jnp.zeros((b,), dtype))
    # scan runs over the leading axis, so time goes first: [T, B].
    xs = (rewards_BT.T, values_BT.T, mask_BT.T)
    _, advantages_TB = jax.lax.scan(step, init, xs, reverse=True)
    advantages_BT = advantages_TB.T
    returns_BT = (advantages_BT + values_BT) * mask_BT
    return advantages_BT, returns_BT


def discounted_returns(rewards_BT: jax.Array, mask_BT: jax.Array, gamma: float = 1.0) -> jax.Array:
    """Reward-to-go `G_t = sum_{l >= t} gamma^(l - t) r_l` over each row's real tokens (the
    Monte-Carlo return REINFORCE uses, no critic). mask_BT is a prefix of ones per row; the
    return is 0 on masked positions and never carries reward across the end of a row.
    """
    dtype = jnp.promote_types(jnp.result_type(rewards_BT), jnp.float32)
    mask_BT = jnp.asarray(mask_BT, dtype)
    rewards_BT = jnp.where(mask_BT != 0, jnp.asarray(rewards_BT, dtype), 0.0)

    def step(next_return_B, xs):
        reward_B, mask_B = xs
        return_B = (reward_B + gamma * next_return_B) * mask_B
        return return_B, return_B

    init = jnp.zeros((rewards_BT.shape[0],), dtype)
    _, returns_TB = jax.lax.scan(step, init, (rewards_BT.T, mask_BT.T), reverse=True)
    return returns_TB.T
