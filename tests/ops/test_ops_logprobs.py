import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops import entropy_from_logits, next_token_logprobs, token_logprobs


def _loop_logprobs(logits, tokens, temperature):
    b, t, _ = logits.shape
    out = np.zeros((b, t))
    ent = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            z = logits[i, j].astype(np.float64) / temperature
            lse = math.log(sum(math.exp(v) for v in z))
            out[i, j] = z[tokens[i, j]] - lse
            p = [math.exp(v - lse) for v in z]
            ent[i, j] = -sum(pi * (v - lse) for pi, v in zip(p, z))
    return out, ent


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 5, 7), (3, 4, 33)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_against_loop(shape, temperature):
    rng = np.random.default_rng(sum(shape))
    logits = (rng.normal(size=shape) * 3).astype(np.float32)
    tokens = rng.integers(0, shape[-1], size=shape[:2])
    want_lp, want_ent = _loop_logprobs(logits, tokens, temperature)
    np.testing.assert_allclose(
        token_logprobs(logits, tokens, temperature), want_lp, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        entropy_from_logits(logits, temperature), want_ent, rtol=1e-5, atol=1e-5
    )


def test_next_token_alignment_against_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    ids = rng.integers(0, 9, size=(2, 6))
    got = np.asarray(next_token_logprobs(logits, ids, 0.9))
    assert got.shape == (2, 5)
    for b in range(2):
        for t in range(5):  # logits at t score ids at t + 1
            z = logits[b, t].astype(np.float64) / 0.9
            want = z[ids[b, t + 1]] - np.log(np.exp(z).sum())
            np.testing.assert_allclose(got[b, t], want, rtol=1e-5)


def test_hand_values():
    logits = jnp.array([[[0.0, math.log(3.0)]]])
    # softmax([0, log 3]) = [1/4, 3/4]
    np.testing.assert_allclose(
        token_logprobs(logits, jnp.array([[1]])), [[math.log(0.75)]], rtol=1e-6
    )
    np.testing.assert_allclose(
        token_logprobs(logits, jnp.array([[0]])), [[math.log(0.25)]], rtol=1e-6
    )
    # H = -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351
    np.testing.assert_allclose(entropy_from_logits(logits), [[0.5623351446]], rtol=1e-6)
    # Temperature 2: z = [0, log(3)/2] -> p_1 = sqrt(3) / (1 + sqrt(3))
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    np.testing.assert_allclose(
        token_logprobs(logits, jnp.array([[1]]), 2.0), [[math.log(p1)]], rtol=1e-6
    )
    # Uniform over V = 4: log p = -log 4, H = log 4.
    np.testing.assert_allclose(
        token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]])), [[-math.log(4)]]
    )
    np.testing.assert_allclose(
        entropy_from_logits(jnp.zeros((1, 1, 4))), [[math.log(4)]], rtol=1e-6
    )


def test_bf16_logits_give_float32_and_traced_temperature():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
    out = token_logprobs(logits, tokens)
    assert out.dtype == jnp.float32 and entropy_from_logits(logits).dtype == jnp.float32
    # A temperature passed as a traced value (e.g. from state) works under jit.
    f = jax.jit(token_logprobs)
    np.testing.assert_allclose(
        f(logits, tokens, jnp.float32(0.5)), token_logprobs(logits, tokens, 0.5), rtol=1e-6
    )


def test_gradient_is_onehot_minus_softmax():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(1, 1, 5)), jnp.float32)
    g = jax.grad(lambda z: token_logprobs(z, jnp.array([[3]]))[0, 0])(logits)
    want = np.eye(5)[3] - np.asarray(jax.nn.softmax(logits[0, 0]))
    np.testing.assert_allclose(g[0, 0], want, rtol=1e-5, atol=1e-6)
