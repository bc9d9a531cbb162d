import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.ops import explained_variance


def test_hand_values():
    target = jnp.array([[1.0, 2.0, 3.0, 99.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    # Perfect prediction: 1 - 0 / Var = 1 (the padded 99 vs -5 is ignored).
    assert float(explained_variance(jnp.array([[1.0, 2.0, 3.0, -5.0]]), target, mask)) == 1.0
    # Constant prediction 2: residual = target - 2 has the target's variance -> 0.
    np.testing.assert_allclose(
        explained_variance(jnp.full((1, 4), 2.0), target, mask), 0.0, atol=1e-6
    )
    # pred = [1, 1, 1]: residual [0, 1, 2], Var = 2/3; Var[target] = 2/3 -> 0.
    np.testing.assert_allclose(explained_variance(jnp.ones((1, 4)), target, mask), 0.0, atol=1e-6)
    # pred = [2, 2, 4]: residual [-1, 0, -1], mean -2/3, Var = (1/9 + 4/9 + 1/9)/3 = 2/9
    #   -> 1 - (2/9) / (2/3) = 2/3
    np.testing.assert_allclose(
        explained_variance(jnp.array([[2.0, 2.0, 4.0, 0.0]]), target, mask), 2 / 3, rtol=1e-6
    )


def test_against_numpy_loop():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, 6)).astype(np.float32)
    pred = (target + 0.3 * rng.normal(size=(4, 6))).astype(np.float32)
    mask = (np.arange(6)[None] < np.array([6, 2, 4, 1])[:, None]).astype(np.float32)
    t = [float(target[i, j]) for i in range(4) for j in range(6) if mask[i, j]]
    r = [float(target[i, j] - pred[i, j]) for i in range(4) for j in range(6) if mask[i, j]]
    want = 1 - np.var(r) / np.var(t)
    np.testing.assert_allclose(explained_variance(pred, target, mask), want, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(explained_variance)(pred, target, mask), want, rtol=1e-5)


def test_constant_target_is_nan():
    assert np.isnan(explained_variance(jnp.zeros((1, 3)), jnp.ones((1, 3)), jnp.ones((1, 3))))
