import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import kwise_ranking, pairwise_mean


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _loop(rewards, rank, mask):
    """Explicit double loop over the pairs of each prompt.

    Without ties a prompt with K completions has C(K, 2) pairs, so this is InstructGPT's
    -1/C(K, 2) sum log sigmoid(r_w - r_l); with ties the denominator is the number of actual
    comparisons (a tie is not a comparison).
    """
    per_prompt, all_pairs = [], []
    for b in range(rewards.shape[0]):
        k = int(mask[b].sum())
        terms = []
        for i, j in itertools.combinations(range(k), 2):
            if rank[b, i] == rank[b, j]:
                continue
            win, lose = (i, j) if rank[b, i] < rank[b, j] else (j, i)
            d = float(rewards[b, win]) - float(rewards[b, lose])
            terms.append(_log_sigmoid(d))
            all_pairs.append(d)
        if terms:
            per_prompt.append(-sum(terms) / len(terms))
    pairwise = -sum(_log_sigmoid(d) for d in all_pairs) / len(all_pairs)
    return sum(per_prompt) / len(per_prompt), pairwise, all_pairs


def _ragged_batch(seed, ks, kmax=9, ties=True):
    rng = np.random.default_rng(seed)
    b = len(ks)
    rewards = rng.normal(size=(b, kmax)).astype(np.float32) * 2
    rank = np.full((b, kmax), 99, np.int32)  # padded completions carry a junk rank
    mask = np.zeros((b, kmax), np.float32)
    for i, k in enumerate(ks):
        r = rng.permutation(k)
        if ties and k > 2:
            r = np.minimum(r, k - 2)  # the two worst completions tie
        rank[i, :k] = r
        mask[i, :k] = 1.0
        rewards[i, k:] = 1e4  # garbage in padding
    return rewards, rank, mask


@pytest.mark.parametrize("ks", [[2], [2, 9, 5], [9, 9], [3, 4, 2, 8, 6, 7]])
@pytest.mark.parametrize("ties", [False, True])
def test_kwise_against_double_loop(ks, ties):
    rewards, rank, mask = _ragged_batch(len(ks) + 10 * ties, ks, ties=ties)
    want, want_pairwise, pairs = _loop(rewards, rank, mask)
    batch = {"rank": rank, "completion_mask": mask}
    out = kwise_ranking({"rewards": rewards}, batch)
    np.testing.assert_allclose(out.loss, want, rtol=1e-5)
    assert float(out.metrics["rm/pairs"]) == len(pairs)
    np.testing.assert_allclose(out.metrics["rm/accuracy"], np.mean([d > 0 for d in pairs]))
    np.testing.assert_allclose(out.metrics["rm/margin"], np.mean(pairs), rtol=1e-5, atol=1e-6)
    pw = pairwise_mean({"rewards": rewards}, batch)
    np.testing.assert_allclose(pw.loss, want_pairwise, rtol=1e-5)
    if not ties:
        assert float(out.metrics["rm/pairs"]) == sum(k * (k - 1) // 2 for k in ks)


def test_hand_values():
    # K = 2, r = [1, 0], first is better: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    out = kwise_ranking(
        {"rewards": jnp.array([[1.0, 0.0]])},
        {"rank": jnp.array([[0, 1]]), "completion_mask": jnp.ones((1, 2))},
    )
    np.testing.assert_allclose(out.loss, math.log1p(math.exp(-1)), rtol=1e-6)
    assert float(out.metrics["rm/accuracy"]) == 1.0 and float(out.metrics["rm/margin"]) == 1.0
    # K = 3, all rewards equal: each of the 3 pairs costs log 2 -> mean log 2.
    # With ranks [0, 0, 1] only (0, 2) and (1, 2) are comparisons: still log 2, 2 pairs.
    for rank, n_pairs in (([0, 1, 2], 3), ([0, 0, 1], 2)):
        out = kwise_ranking(
            {"rewards": jnp.zeros((1, 3))},
            {"rank": jnp.array([rank]), "completion_mask": jnp.ones((1, 3))},
        )
        np.testing.assert_allclose(out.loss, math.log(2), rtol=1e-6)
        assert float(out.metrics["rm/pairs"]) == n_pairs
        assert float(out.metrics["rm/accuracy"]) == 0.0  # r_w > r_l never holds on a tie


def test_prompts_weighted_equally():
    # Prompt A: 9 completions, ranked correctly by a wide margin -> 36 pairs, loss ~ 0.
    # Prompt B: 2 completions in the wrong order by 2 -> 1 pair, loss log(1 + e^2) = 2.126928.
    # K-wise: (0 + 2.1269) / 2 per prompt; pairwise-mean: (36 * 0 + 2.1269) / 37.
    rewards = np.zeros((2, 9), np.float32)
    rewards[0] = 30.0 * np.arange(9)[::-1]
    rewards[1, :2] = [0.0, 2.0]
    rank = np.tile(np.arange(9), (2, 1))
    mask = np.zeros((2, 9), np.float32)
    mask[0] = 1.0
    mask[1, :2] = 1.0
    batch = {"rank": rank, "completion_mask": mask}
    b_loss = math.log1p(math.exp(2.0))
    kw = kwise_ranking({"rewards": rewards}, batch)
    np.testing.assert_allclose(kw.loss, b_loss / 2, rtol=1e-5)
    np.testing.assert_allclose(
        pairwise_mean({"rewards": rewards}, batch).loss, b_loss / 37, rtol=1e-5
    )
    # The gradient on prompt B's pair is the same as if prompt A had only 2 completions.
    g = jax.grad(lambda r: kwise_ranking({"rewards": r}, batch).loss)(jnp.asarray(rewards))
    small = {"rank": rank[:, :2], "completion_mask": np.ones((2, 2), np.float32)}
    g_small = jax.grad(lambda r: kwise_ranking({"rewards": r}, small).loss)(
        jnp.asarray(rewards[:, :2])
    )
    np.testing.assert_allclose(g[1, :2], g_small[1], rtol=1e-5)


def test_prompt_without_pairs_is_skipped():
    # Row 1 has all completions tied: no comparison, so it must not dilute the mean.
    rewards = jnp.array([[1.0, 0.0], [5.0, -5.0]])
    out = kwise_ranking(
        {"rewards": rewards},
        {"rank": jnp.array([[0, 1], [0, 0]]), "completion_mask": jnp.ones((2, 2))},
    )
    np.testing.assert_allclose(out.loss, math.log1p(math.exp(-1)), rtol=1e-6)
