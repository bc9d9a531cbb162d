"""Group statistics, token reductions and reward-to-go against plain Python loops."""

import numpy as np
import pytest

from rlhf_jax.ops import (
    discounted_returns,
    group_mean,
    group_size,
    group_std,
    groups_all_equal,
    leave_one_out_mean,
    reduce_tokens,
)

# Ragged, non-adjacent groups: a singleton (id 5), a pair, a triple, equal members (id 2).
IDS = np.array([3, 0, 3, 5, 0, 3, 2, 2], np.int32)
X = np.array([1.0, -2.0, 4.0, 7.0, 0.5, -1.0, 3.0, 3.0], np.float32)


def _members(i):
    return [j for j in range(len(IDS)) if IDS[j] == IDS[i]]


def test_group_statistics_against_loops():
    for i in range(len(X)):
        m = _members(i)
        vals = [float(X[j]) for j in m]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        others = [float(X[j]) for j in m if j != i]
        loo = sum(others) / len(others) if others else float(X[i])
        assert group_size(IDS)[i] == len(m)
        np.testing.assert_allclose(group_mean(X, IDS)[i], mean, rtol=1e-6)
        np.testing.assert_allclose(group_std(X, IDS)[i], var**0.5, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(leave_one_out_mean(X, IDS)[i], loo, rtol=1e-6)
        assert bool(groups_all_equal(X, IDS)[i]) == (max(vals) == min(vals))


def test_biased_std_and_singletons():
    ids = np.arange(4, dtype=np.int32)  # G = 1: every sample its own group
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    np.testing.assert_array_equal(group_std(x, ids), 0.0)
    np.testing.assert_array_equal(x - leave_one_out_mean(x, ids), 0.0)
    np.testing.assert_allclose(group_std(X, IDS, unbiased=False)[6], 0.0)
    pair = np.array([0, 0], np.int32)
    np.testing.assert_allclose(group_std(np.array([1.0, 3.0]), pair, unbiased=False), [1.0, 1.0])


LENGTHS = [5, 2, 0, 3]
T = 6


def _per_token():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, T)).astype(np.float32)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
    x[mask == 0] = np.nan  # padding carries garbage
    return x, mask


def _loop_reduce(x, mask, reduction, token_count=None, sequence_count=None):
    rows = [[float(x[b, t]) for t in range(T) if mask[b, t]] for b in range(x.shape[0])]
    if reduction == "token_mean":
        n = token_count if token_count is not None else sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / n
    s = sequence_count if sequence_count is not None else x.shape[0]
    if reduction == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows if r) / s
    return sum(sum(r) for r in rows) / (s * T)


@pytest.mark.parametrize(
    "reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
def test_reductions_against_loops(reduction):
    x, mask = _per_token()
    np.testing.assert_allclose(
        reduce_tokens(x, mask, reduction), _loop_reduce(x, mask, reduction), rtol=1e-5
    )
    np.testing.assert_allclose(
        reduce_tokens(x, mask, reduction, token_count=20.0, sequence_count=8.0),
        _loop_reduce(x, mask, reduction, 20.0, 8.0),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
)
def test_global_counts_make_the_mean_of_uneven_halves_exact(reduction):
    """Rows 0-1 hold 7 tokens, rows 2-3 hold 3: the mean of the two halves' losses, each
    normalised by half the whole batch's counts, is the whole batch's loss."""
    x, mask = _per_token()
    whole = reduce_tokens(x, mask, reduction)
    tokens, seqs = mask.sum() / 2, x.shape[0] / 2
    halves = [
        reduce_tokens(x[rows], mask[rows], reduction, tokens, seqs)
        for rows in (slice(0, 2), slice(2, 4))
    ]
    np.testing.assert_allclose(np.mean(halves), whole, rtol=1e-6)
    if reduction == "token_mean":  # and a mean of per-half means would not be
        naive = np.mean([reduce_tokens(x[r], mask[r]) for r in (slice(0, 2), slice(2, 4))])
        assert abs(naive - whole) > 1e-3


def test_empty_mask_reduces_to_zero():
    x = np.ones((2, 3), np.float32)
    for reduction in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert float(reduce_tokens(x, np.zeros((2, 3)), reduction)) == 0.0
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_tokens(x, np.ones((2, 3)), "sum")


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_against_a_backward_loop(gamma):
    x, mask = _per_token()
    got = np.asarray(discounted_returns(x, mask, gamma))
    for b, n in enumerate(LENGTHS):
        running = 0.0
        for t in reversed(range(T)):
            if t >= n:
                assert got[b, t] == 0.0
                continue
            running = float(x[b, t]) + gamma * running
            np.testing.assert_allclose(got[b, t], running, rtol=1e-5)
