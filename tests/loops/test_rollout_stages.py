"""The rollout stages' filling of a batch from several sampling rounds, against the batch
assembled by hand: kept groups in round order, then the first round's dropped groups when the
rounds run out; rows moved whole and group ids renumbered by position."""

import jax
import numpy as np
import pytest

from rlhf_jax.loops.rollout_stages import _merge_fn, fill_rounds
from rlhf_jax.steps.experience import Rollout, Scored

G, GROUPS, N = 3, 4, 2  # samples per group, groups per batch, response tokens


def _round(r):
    """Round r's rows, each tagged with (round, row) so the result can be traced back."""
    b = G * GROUPS
    tag = (100 * r + np.arange(b)).astype(np.int32)
    ids = np.repeat(tag[:, None], N, axis=1)
    rollout = Rollout(
        sequence_ids=ids,
        sequence_mask=np.ones((b, N), np.float32),
        response_ids=ids,
        response_mask=np.ones((b, N), np.float32),
        logprobs=ids.astype(np.float32) / 7,
        group_ids=(np.arange(b) // G).astype(np.int32),
    )
    return rollout, Scored(tag.astype(np.float32), np.ones(b, bool))


def _by_hand(keeps):
    kept = [(r, grp) for r, keep in enumerate(keeps) for grp in np.flatnonzero(keep)]
    dropped = [(0, grp) for grp in np.flatnonzero(~keeps[0])]
    chosen = (kept + dropped)[:GROUPS]  # round 0's dropped groups only ever fill the rest
    return np.concatenate([100 * r + grp * G + np.arange(G) for r, grp in chosen])


@pytest.mark.parametrize(
    "keeps,max_rounds,rounds",
    [
        ([[1, 1, 1, 1]], 3, 1),  # everything kept: one round, the batch as sampled
        ([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1]], 3, 3),  # 2 + 1 + 1 of 2: full
        ([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], 2, 2),  # rounds run out: 1 kept, 3 filler
        ([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], 3, 2),  # round 1 fills the whole batch
    ],
)
def test_rounds_fill_the_batch_as_by_hand(keeps, max_rounds, rounds):
    keeps = [np.asarray(k, bool) for k in keeps]
    seen = []

    def sample_round(r):
        seen.append(r)
        return _round(r)

    def decide(new):
        r = int(new[1].scores[0]) // 100
        return keeps[r]

    merge = jax.jit(_merge_fn(G))
    (rollout, scored), metrics = fill_rounds(sample_round, decide, merge, (GROUPS, G, max_rounds))
    assert seen == list(range(rounds))
    want = _by_hand(keeps[:rounds])
    np.testing.assert_array_equal(np.asarray(scored.scores), want)
    np.testing.assert_array_equal(np.asarray(rollout.response_ids)[:, 0], want)
    np.testing.assert_array_equal(np.asarray(rollout.logprobs)[:, 1], want.astype(np.float32) / 7)
    np.testing.assert_array_equal(rollout.group_ids, np.arange(G * GROUPS) // G)
    n_kept = sum(int(k.sum()) for k in keeps[:rounds])
    assert metrics == {
        "rollout/filter_rounds": rounds,
        "rollout/filter_kept_fraction": n_kept / (GROUPS * rounds),
        "rollout/filter_filled_fraction": min(n_kept, GROUPS) / GROUPS,
    }
