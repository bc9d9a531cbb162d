"""The rollout stages' filling of a batch from several sampling rounds, against the batch
assembled by hand: kept groups in round order, then the first round's dropped groups when the
rounds run out; rows moved whole and group ids renumbered by position."""

import json

import jax
import numpy as np
import pytest

from rlhf_jax.cli import main
from rlhf_jax.loops.rollout_stages import fill_rounds, merge_fn
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

    merge = jax.jit(merge_fn(G))
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


def test_a_forks_filter_from_config_runs_with_dynamic_sampling(run_dir, tmp_path):
    """One run, two filters from config: DAPO's and a fork's from its own module (by
    `module:function`, no library edit). What the fork's filter was shown, round by round,
    accounts for every metric of the rollout stages, and the scores it saw are the ones the
    rest of the experience used (the missing-EOS rule applied before the filters).

    The same run, with no critic and no KL term, is test_part_keys.py's: the probes of
    tests/fork_key_probes.py (the policy loss, GRPO's advantage and a third filter that keeps
    everything, each doing what the built-in does) record the batch keys they are handed,
    which must be exactly those `contract.keys.BATCH_KEYS` declares."""
    import fork_key_probes as probes
    import fork_rollout_parts
    from test_part_keys import _received

    from rlhf_jax.contract import batch_keys

    fork_rollout_parts.SEEN.clear()
    probes.SEEN.clear()
    out, data = tmp_path / "filtered", run_dir / "data"
    args = [
        "ppo",
        "--output",
        str(out),
        "log.every=1",
        "log.progress=false",
        "ppo.iterations=2",
        "ppo.epochs=1",
        "ppo.max_new_tokens=8",
        "ptx.coef=0",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        "ppo.reward_fn=topics_gold",
        "ppo.advantage=fork_key_probes:group_advantage",  # GRPO's
        "ppo.policy_loss=fork_key_probes:policy",
        "ppo.samples_per_prompt=2",
        "ppo.rollout_batch=4",
        "ppo.minibatch_size=8",
        "ppo.kl_penalty=none",
        "ppo.rollout_filters=[{name: dynamic_sampling}, "
        "{name: 'fork_rollout_parts:short_responses', kwargs: {max_tokens: 7}}, "
        "{name: 'fork_key_probes:rollout_filter'}]",
        "ppo.rollout_max_rounds=3",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    g, groups = 2, 4
    # The load-time dry run called it on the contract's 4-row sample first.
    assert len(fork_rollout_parts.SEEN[0]["scores"]) == 4
    seen = [b for b in fork_rollout_parts.SEEN if len(b["scores"]) == g * groups]
    assert len(seen) == sum(r["rollout/filter_rounds"] for r in rows)
    for row in rows:
        n = int(row["rollout/filter_rounds"])
        rounds, seen = seen[:n], seen[n:]
        keeps = []
        for batch in rounds:
            s = batch["scores"].reshape(-1, g)
            short = batch["response_mask"].sum(axis=1).reshape(-1, g) <= 7
            keeps.append((s.max(axis=1) > s.min(axis=1)) & short.all(axis=1))
        kept = sum(int(k.sum()) for k in keeps)
        assert row["rollout/filter_kept_fraction"] == pytest.approx(kept / (groups * n))
        assert row["rollout/filter_filled_fraction"] == pytest.approx(min(kept, groups) / groups)
        assert n == 3 or kept >= groups  # another round only while the batch was not full
        chosen = [(r, grp) for r, k in enumerate(keeps) for grp in np.flatnonzero(k)]
        chosen = (chosen + [(0, grp) for grp in np.flatnonzero(~keeps[0])])[:groups]
        scores = np.concatenate([rounds[r]["scores"].reshape(-1, g)[grp] for r, grp in chosen])
        assert row["objective/scores"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert not seen
    try:
        assert _received("policy") == set(batch_keys("policy"))
        assert _received("advantage") == set(batch_keys("advantage"))
        assert _received("rollout_filter") == set(batch_keys("rollout_filter"))
    finally:
        probes.SEEN.clear()
