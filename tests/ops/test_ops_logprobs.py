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


# --- Log-probs under top-k / top-p (docs/algorithms.md, "Log-probs under top-k / top-p") ---


def _np_support(words, vocab_size):
    """Unpack with NumPy's own bit order (little: token v is bit v % 32 of word v // 32)."""
    as_bytes = np.ascontiguousarray(np.asarray(words, "<u4")).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :vocab_size].astype(bool)


def _np_truncated(logits, tokens, keep, temperature):
    """Log-prob and entropy of each token under softmax(z) renormalised over keep u {token}."""
    b, t, v = logits.shape
    logp, ent = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            kept = [u for u in range(v) if keep[i, j, u] or u == tokens[i, j]]
            z = {u: float(logits[i, j, u]) / temperature for u in kept}
            lse = math.log(sum(math.exp(x) for x in z.values()))
            logp[i, j] = z[tokens[i, j]] - lse
            ent[i, j] = -sum(math.exp(x - lse) * (x - lse) for x in z.values())
    return logp, ent


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 61, 64])
def test_pack_support_round_trips_and_uses_little_endian_bits(vocab_size):
    from rlhf_jax.ops import pack_support, unpack_support

    keep = np.random.default_rng(vocab_size).random((2, 3, vocab_size)) < 0.4
    words = np.asarray(pack_support(jnp.asarray(keep)))
    assert words.dtype == np.uint32 and words.shape == (2, 3, -(-vocab_size // 32))
    np.testing.assert_array_equal(_np_support(words, vocab_size), keep)
    np.testing.assert_array_equal(unpack_support(jnp.asarray(words), vocab_size), keep)


def test_issue_20_k3_of_top_k_log_probs_has_finite_gradients():
    """Issue 20's reproduction: under top-k the padded position's token (the argmin) was
    outside the kept set, its log-prob finfo.min, k3 there inf, and `where(mask, k3, 0)` gave
    NaN gradients. The token now counts as kept: every log-prob is finite."""
    from rlhf_jax.ops import kl_estimate, policy_token_logprobs

    lg = jax.random.normal(jax.random.key(0), (1, 3, 8))
    tok = jnp.stack([jnp.argmax(lg[0, 0]), jnp.argmax(lg[0, 1]), jnp.argmin(lg[0, 2])])[None]
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    ref = jnp.full((1, 3), -1.5)

    def where_after(lg):  # the pattern steps/rl_update.py used
        logp, _ = policy_token_logprobs(lg, tok, 1.0, top_k=2)
        kl = jnp.where(mask != 0, kl_estimate(logp, ref, "k3"), 0.0)
        return jnp.sum(kl) / jnp.sum(mask)

    value, grad = jax.value_and_grad(where_after)(lg)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # the values: top-2 renormalised (the argmin joins the top 2 at the padded position)
    lg_np = np.asarray(lg, np.float64)
    keep = lg_np >= np.sort(lg_np, axis=-1)[..., -2:-1]
    want, _ = _np_truncated(lg_np, np.asarray(tok), keep, 1.0)
    logp, _ = policy_token_logprobs(lg, tok, 1.0, top_k=2)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-6)
    d = want[0, :2] + 1.5
    np.testing.assert_allclose(value, np.mean(np.exp(-d) - 1 + d), rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_over_a_recorded_support_against_loop(temperature):
    """With the sampler's support, log-probs and entropies are the softmax renormalised over
    it (plus the token itself), finite with finite gradients even where the token is not in
    it; the gradient is zero on every logit outside it."""
    from rlhf_jax.ops import pack_support, policy_token_logprobs

    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(2, 4, 37)) * 3).astype(np.float32)
    keep = rng.random((2, 4, 37)) < 0.3
    tokens = rng.integers(0, 37, (2, 4))
    tokens[0, 0] = np.flatnonzero(~keep[0, 0])[0]  # a token outside its support
    words = pack_support(jnp.asarray(keep))
    want_lp, want_ent = _np_truncated(logits, tokens, keep, temperature)
    logp, ent = policy_token_logprobs(logits, tokens, temperature, support_BTW=words)
    np.testing.assert_allclose(logp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)

    def total(lg):
        lp, en = policy_token_logprobs(lg, tokens, temperature, support_BTW=words)
        return jnp.sum(lp) + jnp.sum(en)

    grad = np.asarray(jax.grad(total)(jnp.asarray(logits)))
    assert np.all(np.isfinite(grad))
    outside = ~keep & (np.arange(37) != tokens[..., None])
    assert np.all(grad[outside] == 0.0)


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (4, 0.6)])
def test_log_probs_from_top_k_top_p_equal_those_over_the_packed_kept_set(top_k, top_p):
    from rlhf_jax.ops import kept_tokens, pack_support, policy_token_logprobs

    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 3, 40)) * 2, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 40, (2, 3)))
    words = pack_support(kept_tokens(logits / 0.8, top_k, top_p))
    derived = policy_token_logprobs(logits, tokens, 0.8, top_k, top_p)
    recorded = policy_token_logprobs(logits, tokens, 0.8, support_BTW=words)
    for a, b in zip(derived, recorded):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("temperature", [1e-39, 1e-12, 1e-6, 0.7, 3.0])
def test_any_temperature_gives_the_samplers_log_probs_and_float64s(temperature):
    # The trainer divided unshifted logits by T (the sampler shifts first): at T != 1 the two
    # formulas differed in rounding, the entropy lost its digits to cancellation (-3e-5 at
    # T = 0.7 here), and below float32's smallest normal number (the sampler's greedy
    # temperatures, scored at T = 1) the trainer divided by a flushed 0 and gave NaN.
    from rlhf_jax.rollout.sampling import sample_token_and_support

    logits = jax.random.normal(jax.random.key(3), (4, 11)) * 5.0 + 40.0
    token, sampler_logp, _ = sample_token_and_support(logits, jax.random.key(4), temperature)
    trainer_logp = token_logprobs(logits[:, None, :], token[:, None], temperature)[:, 0]
    entropy = entropy_from_logits(logits[:, None, :], temperature)[:, 0]
    t = 1.0 if temperature < np.finfo(np.float32).tiny else temperature
    z = np.asarray(logits, np.float64)
    z = (z - z.max(-1, keepdims=True)) / t
    logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want_entropy = -(np.exp(logq) * logq).sum(-1)
    np.testing.assert_allclose(trainer_logp, logq[np.arange(4), np.asarray(token)], atol=1e-5)
    np.testing.assert_allclose(trainer_logp, sampler_logp, rtol=1e-5, atol=1e-5)
    # At T = 1 (and so at a greedy temperature) the logits are not shifted: the common path
    # keeps its bits, and `lse - sum p z` keeps float32's cancellation, ~eps * |logit| (40).
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-4, atol=1e-6 if t != 1 else 3e-4)
