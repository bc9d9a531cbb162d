"""Sampling against the textbook definitions of temperature, top-k and top-p on a tiny vocabulary.

Expected distributions are computed here with plain NumPy from the definitions; the library's
samples (20,000 draws) must match them within 5 standard errors per token, never draw a token
outside the allowed set, and report log-probs equal to log(expected probability).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rollout.sampling import first_argmax, sample_token

LOGITS = np.array([2.0, 1.5, 0.3, 0.0, -1.0, -2.5], dtype=np.float32)
N_DRAWS = 20_000


def expected_probs(logits, temperature, top_k=None, top_p=None):
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    if top_k is not None:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if top_p is not None:
        # smallest prefix of the sorted tokens whose mass reaches top_p
        mass, nucleus = 0.0, []
        for i in np.argsort(-p):
            nucleus.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        p = np.where(np.isin(np.arange(len(p)), nucleus), p, 0.0)
        p /= p.sum()
    return p


def draw(temperature, top_k=None, top_p=None):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N_DRAWS, LOGITS.size))
    fn = jax.jit(lambda lg, k: sample_token(lg, k, temperature, top_k, top_p))
    tokens, logps = fn(logits, jax.random.key(42))
    return np.asarray(tokens), np.asarray(logps)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (1.0, None, None),
        (0.5, None, None),
        (2.0, None, None),
        (1.0, 3, None),
        (1.0, None, 0.8),
        (0.7, 4, 0.9),
        (1.3, None, 0.5),
    ],
)
def test_sampling_matches_definition(temperature, top_k, top_p):
    p = expected_probs(LOGITS.astype(np.float64), temperature, top_k, top_p)
    tokens, logps = draw(temperature, top_k, top_p)
    freq = np.bincount(tokens, minlength=LOGITS.size) / N_DRAWS
    stderr = np.sqrt(p * (1 - p) / N_DRAWS)
    assert np.all(np.abs(freq - p) <= 5 * stderr + 1e-12), (freq, p)
    assert np.all(freq[p == 0] == 0), "a filtered-out token was sampled"
    np.testing.assert_allclose(logps, np.log(p[tokens]), rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax_with_plain_logprob():
    tokens, logps = draw(0.0)
    assert np.all(tokens == np.argmax(LOGITS))
    log_softmax = LOGITS - np.log(np.exp(LOGITS).sum())
    np.testing.assert_allclose(logps, log_softmax[np.argmax(LOGITS)], rtol=1e-6)


@pytest.mark.parametrize("temperature", [1e-6, 1e-12, 1e-30, 1e-39, 1e-300])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_a_tiny_temperature_samples_the_greedy_token_compiled(temperature, scale):
    """The limit of the tempered distribution as T -> 0 is the argmax with probability 1: the
    greedy token with log-prob 0 (below float32's smallest normal number, the greedy path
    itself). Compiled, as the decode loop runs it (XLA's fused log-softmax of logits / 1e-12
    gave an inf log-prob and token 0)."""
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]) * scale)
    token, logp = jax.jit(lambda x, k: sample_token(x, k, temperature))(logits, jax.random.key(0))
    np.testing.assert_array_equal(token, [0, len(LOGITS) - 1])
    assert np.all(np.isfinite(logp))
    if temperature > np.finfo(np.float32).tiny:
        np.testing.assert_array_equal(logp, 0.0)


def test_top_p_keeps_at_least_one_token():
    tokens, _ = draw(1.0, None, 1e-6)
    assert np.all(tokens == np.argmax(LOGITS))


def test_top_k_one_is_greedy():
    tokens, logps = draw(1.0, 1, None)
    assert np.all(tokens == np.argmax(LOGITS))
    np.testing.assert_allclose(logps, 0.0, atol=1e-6)


def test_draw_over_many_vocabulary_blocks_matches_definition():
    """A vocabulary of 700 (not a multiple of the 128-entry CDF block) with whole blocks and
    scattered tokens filtered out: the two-level draw must still follow exp(logp) exactly
    and never land on a zero-probability token or past the vocabulary."""
    v = 700
    rng = np.random.default_rng(3)
    logits = rng.normal(size=v).astype(np.float32)
    logits[128:256] = -np.inf  # one whole block impossible
    logits[rng.choice(v, 200, replace=False)] = -np.inf  # and tokens scattered everywhere
    logits[[0, 127, 256, 699]] = [1.5, 2.0, 1.0, 2.5]  # block edges and the last token live
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    batch = jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS, v))
    tokens, logps = jax.jit(lambda lg, k: sample_token(lg, k, 1.0))(batch, jax.random.key(7))
    tokens = np.asarray(tokens)
    assert tokens.min() >= 0 and tokens.max() < v
    assert np.all(p[tokens] > 0), "a zero-probability token was drawn"
    freq = np.bincount(tokens, minlength=v) / N_DRAWS
    stderr = np.sqrt(p * (1 - p) / N_DRAWS)
    assert np.all(np.abs(freq - p) <= 5 * stderr + 1e-12)
    np.testing.assert_allclose(np.asarray(logps), np.log(p[tokens]), rtol=1e-4, atol=1e-5)


def test_first_argmax_matches_numpy_on_ties():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -3.0]])
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, -1))
