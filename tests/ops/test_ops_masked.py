import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.ops import masked_mean, masked_sum, masked_var, masked_whiten

SHAPES = [(1, 1), (3, 5), (4, 7), (2, 16)]


def _ragged(rng, shape):
    """Random x and a 0/1 mask with at least one real entry."""
    x = rng.normal(size=shape).astype(np.float32)
    mask = (rng.random(shape) < 0.6).astype(np.float32)
    mask.flat[rng.integers(mask.size)] = 1.0
    return x, mask


def _loop_stats(x, mask):
    vals = [float(v) for v, m in zip(x.ravel(), mask.ravel()) if m]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / n
    return sum(vals), mean, var, n


@pytest.mark.parametrize("shape", SHAPES)
def test_against_loops(shape):
    rng = np.random.default_rng(sum(shape))
    x, mask = _ragged(rng, shape)
    total, mean, var, n = _loop_stats(x, mask)
    np.testing.assert_allclose(masked_sum(x, mask), total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked_mean(x, mask), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked_var(x, mask), var, rtol=1e-5, atol=1e-6)
    if n > 1:
        unbiased = var * n / (n - 1)
        np.testing.assert_allclose(masked_var(x, mask, unbiased=True), unbiased, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_mean_along_axis_against_row_loop(shape):
    rng = np.random.default_rng(7 + sum(shape))
    x, mask = _ragged(rng, shape)
    got = np.asarray(masked_mean(x, mask, axis=1))
    for b in range(shape[0]):
        vals = [x[b, t] for t in range(shape[1]) if mask[b, t]]
        want = sum(vals) / len(vals) if vals else 0.0  # an empty row gives 0
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)


def test_hand_values():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    m = jnp.array([1.0, 1.0, 0.0, 1.0])
    # sum = 1 + 2 + 4 = 7; mean = 7/3
    np.testing.assert_allclose(masked_sum(x, m), 7.0)
    np.testing.assert_allclose(masked_mean(x, m), 7 / 3, rtol=1e-6)
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 42/9; biased /3 = 14/9
    np.testing.assert_allclose(masked_var(x, m), 14 / 9, rtol=1e-6)
    # unbiased: 42/9 / 2 = 7/3
    np.testing.assert_allclose(masked_var(x, m, unbiased=True), 7 / 3, rtol=1e-6)


def test_all_masked_gives_zero_not_nan():
    x = jnp.ones((2, 3))
    m = jnp.zeros((2, 3))
    assert float(masked_mean(x, m)) == 0.0
    assert float(masked_var(x, m)) == 0.0
    assert float(masked_var(x, m, unbiased=True)) == 0.0
    np.testing.assert_array_equal(masked_mean(x, m, axis=1), [0.0, 0.0])
    np.testing.assert_array_equal(masked_whiten(x, m), np.zeros((2, 3)))
    g = jax.grad(lambda x: masked_mean(x, m))(x)
    assert np.all(np.isfinite(g))


def test_garbage_in_masked_entries_is_ignored():
    x = jnp.array([1.0, jnp.inf, 3.0, jnp.nan])
    m = jnp.array([1.0, 0.0, 1.0, 0.0])
    assert float(masked_sum(x, m)) == 4.0
    assert float(masked_mean(x, m)) == 2.0
    assert float(masked_var(x, m)) == 1.0
    np.testing.assert_allclose(masked_whiten(x, m), [-1.0, 0.0, 1.0, 0.0], rtol=1e-6)


def test_fractional_mask_weights():
    # sum_i m_i x_i / sum_i m_i = (0.5 * 2 + 1 * 4) / 1.5 = 5 / 1.5
    np.testing.assert_allclose(masked_mean(jnp.array([2.0, 4.0]), jnp.array([0.5, 1.0])), 10 / 3)


def test_bf16_input_reduced_in_float32():
    x = jnp.full((1000,), 1.0, jnp.bfloat16)
    out = masked_sum(x, jnp.ones(1000))
    assert out.dtype == jnp.float32
    assert float(out) == 1000.0  # bf16 accumulation would stall at 256


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_whiten_against_numpy(shape):
    rng = np.random.default_rng(3 + sum(shape))
    x, mask = _ragged(rng, shape)
    mask[0, :2] = 1.0  # at least two real entries
    _, mean, var, _ = _loop_stats(x, mask)
    want = np.where(mask > 0, (x - mean) / np.sqrt(var + 1e-8), 0.0)
    np.testing.assert_allclose(masked_whiten(x, mask), want, rtol=1e-4, atol=1e-5)
    keep = np.where(mask > 0, (x - mean) / np.sqrt(var + 1e-8) + mean, 0.0)
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False), keep, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(-100, 100, width=32), min_size=2, max_size=12),
    pad=st.lists(st.floats(-1e6, 1e6, width=32), min_size=0, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_whiten_property_zero_mean_unit_var_masked_ignored(values, pad, seed):
    if np.std(values) < 1e-2:  # near-constant input: eps dominates the scale
        return
    x = np.array(values + pad, np.float32)
    mask = np.array([1.0] * len(values) + [0.0] * len(pad), np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, mask = x[perm], mask[perm]
    w = np.asarray(masked_whiten(x, mask))
    np.testing.assert_allclose(masked_mean(w, mask), 0.0, atol=1e-4)
    np.testing.assert_allclose(masked_var(w, mask), 1.0, rtol=1e-3)
    assert np.all(w[mask == 0] == 0.0)
    # Changing the padded entries changes nothing.
    x2 = np.where(mask > 0, x, -x * 3 + 7).astype(np.float32)
    np.testing.assert_array_equal(masked_whiten(x2, mask), w)


def test_jittable():
    x, mask = _ragged(np.random.default_rng(0), (3, 4))
    f = jax.jit(lambda x, m: (masked_mean(x, m, axis=1), masked_var(x, m), masked_whiten(x, m)))
    for a, b in zip(
        f(x, mask), (masked_mean(x, mask, 1), masked_var(x, mask), masked_whiten(x, mask))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
