"""Save -> restore gives back every leaf of a TrainState / RLState, and the restored state
keeps training exactly like the original."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_helpers import assert_trees_equal, fresh_like, sft_rows

from rlhf_jax.checkpointing import (
    Checkpointer,
    abstract_state,
    fingerprint,
    key_from_json,
    key_to_json,
)
from rlhf_jax.config import OptimConfig, PPOConfig
from rlhf_jax.models import init_scalar_head
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    TrainState,
    init_rl_state,
    make_experience_fn,
    make_optimizer,
    make_update_fn,
)


def batch(seed):
    return sft_rows(4, seed=seed)


@pytest.fixture(scope="module")
def trained(sft):
    """A TrainState after 3 updates: non-trivial Adam moments, count and step."""
    config, params, tx, step = sft
    state = TrainState.create(params, tx)
    for i in range(3):
        state, _ = step(state, batch(i), jax.random.key(i))
    return state


def test_train_state_round_trip_and_keeps_training(tmp_path, sft, trained):
    _, _, tx, step = sft
    state = trained
    key = jax.random.key(42)
    meta = {"stage": "sft", "data_position": [0, 3], "rng": key_to_json(key)}
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.save(3, state, meta)
    # a new Checkpointer (as after a restart) restores into a freshly built state
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.latest_step() == 3
        restored, got_meta = ckpt.restore(target=abstract_state(fresh_like(state)))
    assert got_meta == meta and got_meta["data_position"] == [0, 3]
    assert jax.random.key_data(key_from_json(got_meta["rng"])).tolist() == [0, 42]
    assert restored.tx is tx  # the static optimizer comes from the target
    assert_trees_equal(restored, state)
    assert int(restored.opt_state.inner_state[1][0].count) == 3  # Adam's step count
    b9 = batch(9)
    want, want_m = step(state, b9, jax.random.key(9))
    got, got_m = step(restored, b9, jax.random.key(9))
    assert_trees_equal(got, want)
    assert_trees_equal(got_m, want_m)


def test_ppo_state_round_trip_with_ema_and_beta(tmp_path, sft):
    config, params, _, _ = sft
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    ppo = PPOConfig(
        rollout_batch=8,
        minibatch_size=4,
        epochs=1,
        max_new_tokens=4,
        ema_decay=0.9,
        adaptive_kl=True,
        kl_target=100.0,
        kl_horizon=10,
    )
    policy_tx, value_tx = make_optimizer(ppo.policy_optim, 4), make_optimizer(ppo.value_optim, 4)
    state = init_rl_state(params, rm, policy_tx, value_tx, ppo)
    state = jax.device_put(state, jax.devices()[0])  # committed, like restored arrays
    frozen = Frozen(params, rm)
    ids = np.random.default_rng(0).integers(3, 61, (8, 4)).astype(np.int32)
    mask = np.ones((8, 4), np.float32)
    algo = RLAlgorithm.from_config(ppo)
    exp, _ = jax.jit(make_experience_fn(config, config, config, ppo, algo, (2,), 0))(
        state, frozen, ids, mask, jax.random.key(0)
    )
    update = jax.jit(make_update_fn(config, config, ppo, algo))
    state, _ = update(state, exp, None, jax.random.key(1))
    assert float(state.beta) != ppo.beta and int(state.iteration) == 1  # moved from init

    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, {"stage": "ppo"})
        target = abstract_state(jax.eval_shape(lambda: fresh_like(state)))
        restored, meta = ckpt.restore(target=target)
    assert meta == {"stage": "ppo"}
    assert restored.policy.tx is policy_tx and restored.critic.tx is value_tx
    assert restored.ema_params is not None
    assert_trees_equal(restored, state)
    want, want_m = update(state, exp, None, jax.random.key(2))
    got, got_m = update(restored, exp, None, jax.random.key(2))
    assert_trees_equal(got, want)
    assert_trees_equal(got_m, want_m)


def test_async_save_is_safe_against_donation(tmp_path):
    """`save` returns before the write ends; donating the state right after must not change
    what is written."""
    tree = {"w": jnp.arange(2_000_000, dtype=jnp.float32), "n": jnp.array(3)}
    before = jax.tree.map(np.asarray, tree)
    bump = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    with Checkpointer(tmp_path, save_every=5, keep=3) as ckpt:
        assert ckpt.save(5, tree, {})
        tree = bump(tree)
        tree = bump(tree)
        ckpt.wait()
        restored, _ = ckpt.restore(target=abstract_state(tree))
    assert_trees_equal(restored, before)


def test_cadence_keep_and_already_saved(tmp_path):
    tree = {"x": jnp.ones(3)}
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [ckpt.save(s, {"x": tree["x"] * s}, {"s": s}) for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.save(7, tree, {"s": 7}, force=True)  # e.g. the end of training
        assert not ckpt.save(7, tree, {"s": 7}, force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert ckpt.read_meta(6) == {"s": 6}
        restored, _ = ckpt.restore(6, target=tree)
        np.testing.assert_array_equal(restored["x"], np.full(3, 6.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]  # no temporary leftovers
    saved = json.loads((tmp_path / "7" / "meta" / "metadata").read_text())
    assert saved == {"format": 1, "step": 7, "meta": {"s": 7}}


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint(OptimConfig(lr=1e-3))
    assert a == fingerprint(OptimConfig(lr=1e-3)) and len(a) == 16
    assert a != fingerprint(OptimConfig(lr=2e-3))
