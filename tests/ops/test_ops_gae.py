import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops import gae_advantages


def _loop_gae(rewards, values, lengths, gamma, lam):
    b, t = rewards.shape
    adv = np.zeros((b, t))
    ret = np.zeros((b, t))
    for i in range(b):
        last = 0.0
        for j in reversed(range(lengths[i])):
            next_v = values[i, j + 1] if j + 1 < lengths[i] else 0.0  # episode ends
            delta = rewards[i, j] + gamma * next_v - values[i, j]
            last = delta + gamma * lam * last
            adv[i, j] = last
            ret[i, j] = last + values[i, j]
    return adv, ret


def _prefix_mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


@pytest.mark.parametrize("lengths,t", [([1], 1), ([5, 3, 0, 1], 5), ([8, 8], 8), ([2, 7, 4], 9)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)])
def test_against_backward_loop(lengths, t, gamma, lam):
    rng = np.random.default_rng(len(lengths) * 10 + t)
    rewards = rng.normal(size=(len(lengths), t)).astype(np.float32)
    values = rng.normal(size=(len(lengths), t)).astype(np.float32)
    mask = _prefix_mask(lengths, t)
    want_adv, want_ret = _loop_gae(rewards, values, lengths, gamma, lam)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_hand_values_and_padding_ignored():
    # gamma 1, lam 0.5, rewards [0, 0, 1], values 0.5 everywhere, then two padded steps:
    # delta_2 = 1 + 0 - 0.5 = 0.5 (no bootstrap past the end); delta_1 = delta_0 = 0 + 0.5 - 0.5 = 0
    # A_2 = 0.5; A_1 = 0 + 0.5 * 0.5 = 0.25; A_0 = 0 + 0.5 * 0.25 = 0.125
    # R = A + V = [0.625, 0.75, 1.0]
    rewards = jnp.array([[0.0, 0.0, 1.0, 9.0, jnp.nan]])
    values = jnp.array([[0.5, 0.5, 0.5, 100.0, jnp.inf]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    np.testing.assert_allclose(adv, [[0.125, 0.25, 0.5, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.625, 0.75, 1.0, 0.0, 0.0]], rtol=1e-6)


def test_jit_and_grad():
    rng = np.random.default_rng(0)
    rewards = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    mask = jnp.asarray(_prefix_mask([6, 2, 4], 6))
    f = jax.jit(gae_advantages)
    for a, b in zip(f(rewards, values, mask), gae_advantages(rewards, values, mask)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(gae_advantages(rewards, v, mask)[0]))(values)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)
