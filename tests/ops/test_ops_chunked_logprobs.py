"""The chunked log-probs against references built here from plain autodiff (log_softmax over
the whole logits) and a NumPy loop: values and gradients w.r.t. hidden states and head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops import kept_tokens, pack_support
from rlhf_jax.ops.chunked_logprobs import chunked_token_stats

B, T, D, V = 2, 7, 16, 45


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(k[0], (B, T, D))
    head = 0.5 * jax.random.normal(k[1], (D, V))
    tokens = jax.random.randint(k[2], (B, T), 0, V)
    support = pack_support(kept_tokens(jax.random.normal(k[3], (B, T, V)), 9, None))
    g_logp = jax.random.normal(k[4], (B, T))
    g_ent = jax.random.normal(k[5], (B, T))
    return h, head, tokens, support, g_logp, g_ent


def _np_keep(words, logits, tokens, top_k, top_p, temperature):
    """bool [B, T, V]: the support, by a loop over tokens (the token itself always in it)."""
    keep = np.ones(logits.shape, bool)
    for b in range(B):
        for t in range(T):
            if words is not None:
                keep[b, t] = [(int(words[b, t, v // 32]) >> (v % 32)) & 1 for v in range(V)]
            else:
                z = logits[b, t] / temperature
                order = np.argsort(-z, kind="stable")
                kept = np.zeros(V, bool)
                if top_k is not None:
                    kept[z >= z[order[top_k - 1]]] = True
                else:
                    kept[:] = True
                if top_p is not None:
                    zk = np.where(kept, z, -np.inf)
                    srt = np.sort(zk)[::-1]
                    p = np.exp(srt - srt.max())
                    p /= p.sum()
                    n = int(np.sum(np.cumsum(p) - p < top_p))
                    kept &= zk >= srt[n - 1]
                keep[b, t] = kept
            keep[b, t, tokens[b, t]] = True
    return keep


def _reference(h, head, tokens, keep, temperature):
    """log q(token) and H over the support from `log_softmax` of the whole logits (autodiff
    gives the gradient; nothing hand-written)."""
    z = (h @ head) / temperature
    z = jnp.where(keep, z, -1e30)
    logq = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logq, tokens[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.where(keep, jnp.exp(logq) * logq, 0.0), axis=-1)
    return logp, ent


CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(top_p=0.8),
    dict(temperature=0.9, top_k=12, top_p=0.7),
    dict(temperature=1.3, support=True),
]


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_values_and_gradients_equal_the_dense_reference(case, chunk):
    h, head, tokens, support, g_logp, g_ent = _inputs()
    temperature = case.get("temperature", 1.0)
    top_k, top_p = case.get("top_k"), case.get("top_p")
    words = support if case.get("support") else None
    keep = _np_keep(
        None if words is None else np.asarray(words), np.asarray(h @ head), np.asarray(tokens),
        top_k, top_p, temperature,
    )  # fmt: skip

    def chunked(h, head):
        s = chunked_token_stats(
            h, head, tokens, chunk, temperature, top_k, top_p, support_BTW=words
        )
        return jnp.sum(s.logprobs * g_logp + s.entropy * g_ent), s

    def dense(h, head):
        logp, ent = _reference(h, head, tokens, keep, temperature)
        return jnp.sum(logp * g_logp + ent * g_ent), (logp, ent)

    (_, got), got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(h, head)
    (_, want), want_grads = jax.value_and_grad(dense, (0, 1), has_aux=True)(h, head)
    np.testing.assert_allclose(got.logprobs, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.entropy, want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax, np.argmax(np.asarray(h @ head), axis=-1))
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_values_against_a_loop_in_float64():
    h, head, tokens, _, _, _ = _inputs(1)
    logits = np.asarray(h, np.float64) @ np.asarray(head, np.float64)
    s = chunked_token_stats(h, head, tokens, 4, temperature=0.8)
    for b in range(B):
        for t in range(T):
            z = logits[b, t] / 0.8
            lse = math.log(sum(math.exp(v) for v in z))
            assert abs(s.logprobs[b, t] - (z[tokens[b, t]] - lse)) < 1e-5
            ent = -sum(math.exp(v - lse) * (v - lse) for v in z)
            assert abs(s.entropy[b, t] - ent) < 1e-5


def test_bf16_inputs_compute_like_the_dense_head():
    """bf16 hidden states and head: the matmul takes bf16 inputs with float32 output, as
    `models.lm_logits` does; gradients come back in the inputs' dtypes."""
    h, head, tokens, _, g_logp, _ = _inputs(2)
    h16, head16 = h.astype(jnp.bfloat16), head.astype(jnp.bfloat16)

    def loss(h, head):
        s = chunked_token_stats(h, head, tokens, 3, compute_dtype=jnp.bfloat16)
        return jnp.sum(s.logprobs * g_logp)

    logits = jnp.dot(h16, head16, preferred_element_type=jnp.float32)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    got = chunked_token_stats(h16, head16, tokens, 3, compute_dtype=jnp.bfloat16).logprobs
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    gh, ghead = jax.grad(loss, (0, 1))(h16, head16)
    assert gh.dtype == jnp.bfloat16 and ghead.dtype == jnp.bfloat16
    ref_h, ref_head = jax.grad(lambda a, b: loss(a, b), (0, 1))(h, head)
    np.testing.assert_allclose(gh.astype(jnp.float32), ref_h, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(ghead.astype(jnp.float32), ref_head, rtol=0.05, atol=0.05)


def test_no_logits_sized_buffer_in_the_compiled_gradient():
    """The compiled forward + backward holds a chunk's logits, not the whole batch's: its
    temporaries stay far below the dense path's (which keeps [B, T, V] float32 and more)."""
    b, t, d, v = 4, 256, 32, 4096
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    head = jax.ShapeDtypeStruct((d, v), jnp.float32)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def chunked(h, head, tokens):
        return jnp.sum(chunked_token_stats(h, head, tokens, 16, temperature=0.7).logprobs)

    def dense(h, head, tokens):
        logp, _ = _reference(h, head, tokens, True, 0.7)
        return jnp.sum(logp)

    def temp(fn):
        grad = jax.jit(jax.grad(fn, (0, 1)))
        return grad.lower(h, head, tokens).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    assert temp(dense) >= logits_bytes
    assert temp(chunked) < logits_bytes / 4
