import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.ops import (
    AdaptiveKLState,
    adaptive_kl_update,
    kl_estimate,
    per_token_rewards,
)


@pytest.mark.parametrize(
    "logp,ref,want",
    [
        # d = logp - ref = 1: k1 = 1, k2 = 1/2, k3 = exp(-1) - 1 + 1 = e^-1, abs = 1
        (-1.0, -2.0, {"k1": 1.0, "k2": 0.5, "k3": math.exp(-1), "abs": 1.0}),
        # d = -0.5: k1 = -0.5, k2 = 0.125, k3 = exp(0.5) - 1 - 0.5 = 0.1487213, abs = 0.5
        (-2.0, -1.5, {"k1": -0.5, "k2": 0.125, "k3": math.exp(0.5) - 1.5, "abs": 0.5}),
        # d = 0: every estimator is 0
        (-3.0, -3.0, {"k1": 0.0, "k2": 0.0, "k3": 0.0, "abs": 0.0}),
    ],
)
def test_kl_kinds_hand_values(logp, ref, want):
    for kind, value in want.items():
        got = kl_estimate(jnp.array([[logp]]), jnp.array([[ref]]), kind)
        np.testing.assert_allclose(got, [[value]], rtol=1e-6, atol=1e-7, err_msg=kind)


def test_kl_kinds_against_loop():
    rng = np.random.default_rng(0)
    logp = -rng.random((3, 5)).astype(np.float32) * 4
    ref = -rng.random((3, 5)).astype(np.float32) * 4
    fns = {
        "k1": lambda d: d,
        "k2": lambda d: 0.5 * d * d,
        "k3": lambda d: math.exp(-d) - 1 + d,
        "abs": abs,
    }
    for kind, fn in fns.items():
        want = [[fn(float(logp[b, t]) - float(ref[b, t])) for t in range(5)] for b in range(3)]
        np.testing.assert_allclose(kl_estimate(logp, ref, kind), want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(kl_estimate(logp, ref, "k3")) >= 0)


def test_unknown_kl_kind():
    with pytest.raises(RlhfJaxError, match="k1, k2, k3"):
        kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


def test_per_token_rewards_hand_values():
    logp = jnp.array([[-1.0, -2.0, -0.5, -9.0], [-1.0, -7.0, -7.0, -7.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    score = jnp.array([2.0, -1.0])
    rewards, kl = per_token_rewards(score, logp, ref, mask, beta=0.1)
    # k1 = logp - ref on real tokens: row 0 [0.5, -1, 0, pad], row 1 [2, pad, pad, pad]
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # -0.1 * kl, plus the score on the last real token (row 0: t = 2; row 1: t = 0)
    want = [[-0.05, 0.1, 0.0 + 2.0, 0.0], [-0.2 - 1.0, 0.0, 0.0, 0.0]]
    np.testing.assert_allclose(rewards, want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_per_token_rewards_against_loop(kind):
    rng = np.random.default_rng(1)
    b, t = 5, 7
    lengths = [7, 3, 1, 0, 5]
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.float32)
    logp = -rng.random((b, t)).astype(np.float32) * 3
    ref = -rng.random((b, t)).astype(np.float32) * 3
    score = rng.normal(size=b).astype(np.float32)
    kl_all = np.asarray(kl_estimate(logp, ref, kind))
    rewards, kl = per_token_rewards(score, logp, ref, mask, jnp.float32(0.05), kind)
    want = np.zeros((b, t))
    for i in range(b):
        for j in range(lengths[i]):
            want[i, j] = -0.05 * kl_all[i, j]
            if j == lengths[i] - 1:
                want[i, j] += score[i]
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, kl_all * mask, rtol=1e-6)
    assert np.all(np.asarray(rewards)[3] == 0)  # an empty response gets nothing


def test_adaptive_kl_hand_values():
    beta, target, horizon, n = 0.15, 6.0, 10000, 512
    # n / horizon = 0.0512
    cases = {
        6.0: 0.15,  # on target: e = 0
        6.6: 0.15 * (1 + 0.1 * 0.0512),  # e = 6.6/6 - 1 = 0.1
        12.0: 0.15 * (1 + 0.2 * 0.0512),  # e = 1 clipped to +0.2
        0.0: 0.15 * (1 - 0.2 * 0.0512),  # e = -1 clipped to -0.2
        5.4: 0.15 * (1 - 0.1 * 0.0512),  # e = -0.1
    }
    for kl, want in cases.items():
        got = adaptive_kl_update(jnp.float32(beta), jnp.float32(kl), n, target, horizon)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(kl))


def test_adaptive_kl_in_compiled_state():
    def run(state, kl):
        return AdaptiveKLState(adaptive_kl_update(state.beta, kl, 64, 6.0, 1000.0)), state.beta

    kls = jnp.array([12.0, 12.0, 0.0])
    final, _ = jax.jit(lambda s, k: jax.lax.scan(run, s, k))(AdaptiveKLState(jnp.float32(0.1)), kls)
    # Two steps up by (1 + 0.2 * 0.064), one down by (1 - 0.2 * 0.064).
    want = 0.1 * 1.0128**2 * 0.9872
    np.testing.assert_allclose(final.beta, want, rtol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_masked_positions_reach_neither_value_nor_gradient(kind):
    """Garbage on a masked position (a log-prob of -1e30, or -inf) gives an estimate of
    exactly 0 there and a zero gradient, not the 0 * inf = NaN of `where(mask, k(d), 0)`."""
    logp = jnp.asarray([[-1.0, -1e30, -jnp.inf]])
    ref = jnp.asarray([[-2.0, -1.0, -1.0]])
    mask = jnp.asarray([[1.0, 0.0, 0.0]])

    def total(lp, rf):
        return jnp.sum(kl_estimate(lp, rf, kind, mask))

    value = kl_estimate(logp, ref, kind, mask)
    d = 1.0
    want = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d, "abs": d}[kind]
    np.testing.assert_allclose(value, [[want, 0.0, 0.0]], rtol=1e-6)
    g_logp, g_ref = jax.grad(total, argnums=(0, 1))(logp, ref)
    dk = {"k1": 1.0, "k2": d, "k3": 1 - math.exp(-d), "abs": 1.0}[kind]
    np.testing.assert_allclose(g_logp, [[dk, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(g_ref, [[-dk, 0.0, 0.0]], rtol=1e-6)


def test_per_token_rewards_ignore_garbage_on_masked_positions():
    rewards, kl = per_token_rewards(
        jnp.asarray([2.0]),
        jnp.asarray([[-1.0, -1e30]]),
        jnp.asarray([[-2.0, -1.0]]),
        jnp.asarray([[1.0, 0.0]]),
        0.5,
        "k3",
    )
    np.testing.assert_allclose(kl, [[math.exp(-1), 0.0]], rtol=1e-6)
    np.testing.assert_allclose(rewards, [[2.0 - 0.5 * math.exp(-1), 0.0]], rtol=1e-6)
