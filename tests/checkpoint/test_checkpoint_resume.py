"""Stopping after N steps, saving, and resuming in a fresh state gives the run that never
stopped: same parameters, same metrics at every step, bit for bit."""

import jax
import numpy as np
from checkpoint_helpers import assert_trees_equal, sft_rows

from rlhf_jax.checkpointing import Checkpointer, abstract_state, fingerprint
from rlhf_jax.data import batches
from rlhf_jax.steps import TrainState

SEED, BATCH = 3, 4


def train(step, state, arrays, first, last, position):
    """Steps `first..last-1` as the train loop runs them: the data from `position`, one key
    per step folded from the run's seed. Returns the state, per-step metrics, data position."""
    data = batches(arrays, BATCH, seed=SEED, start=tuple(position))
    key = jax.random.key(SEED)
    metrics = []
    for i in range(first, last):
        state, m = step(state, next(data), jax.random.fold_in(key, i))
        metrics.append(jax.device_get(m))
    return state, metrics, data.position


def test_resume_equals_uninterrupted_run(tmp_path, sft):
    config, params, tx, step = sft
    arrays = sft_rows(10, seed=1)  # 2 batches per epoch: the run crosses epoch boundaries
    n = 3
    expected, expected_metrics, _ = train(
        step, TrainState.create(params, tx), arrays, 0, 2 * n, (0, 0)
    )

    # first process: N steps, then save the state and where the data stands
    state, metrics, position = train(step, TrainState.create(params, tx), arrays, 0, n, (0, 0))
    assert position == (1, 1)
    run = {"stage": "sft", "seed": SEED, "config": fingerprint(config)}
    with Checkpointer(tmp_path, save_every=n, keep=2) as ckpt:
        assert ckpt.save(n, state, {**run, "step": n, "data_position": position})
    del state

    # second process: build the state from scratch (other weights), restore, continue
    with Checkpointer(tmp_path, save_every=n, keep=2) as ckpt:
        start = ckpt.latest_step()
        fresh = jax.eval_shape(lambda: TrainState.create(params, tx))
        target = abstract_state(fresh, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        state, meta = ckpt.restore(start, target=target, expect=run)
    assert start == meta["step"] == n and int(state.step) == n
    state, more, _ = train(step, state, arrays, start, 2 * n, meta["data_position"])

    assert_trees_equal(state, expected)
    assert len(metrics + more) == len(expected_metrics)
    for got, want in zip(metrics + more, expected_metrics):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
