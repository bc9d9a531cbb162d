"""An advantage estimator with state of its own (a fork's moving-average baseline, registered
from tests/fork_rollout_parts.py): the state starts as declared, lives in the RL state, and
moves on once per iteration exactly as a plain NumPy recurrence over the batches it saw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fork_rollout_parts import moving_baseline
from test_rl import setup

from rlhf_jax.advantages import AdvantageOut, register_advantage
from rlhf_jax.config import PPOConfig
from rlhf_jax.contract import check_part
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.steps import RLAlgorithm, make_experience_fn, make_update_fn


def _returns(exp):
    mask = np.asarray(exp.response_mask)
    return (np.asarray(exp.rewards) * mask).sum(axis=1), mask


def test_the_estimators_state_moves_on_once_per_iteration():
    config, ppo, algo, state, frozen, ids, mask = setup(
        advantage="fork_moving_baseline", kl_penalty="none"
    )
    assert float(state.advantage_state["baseline"]) == 0 and int(state.advantage_state["seen"]) == 0
    experience = jax.jit(make_experience_fn(config, None, config, ppo, algo, (2,), 0))
    update = jax.jit(make_update_fn(config, None, ppo, algo))
    baseline = None
    for i in range(2):
        exp, _ = experience(state, frozen, ids, mask, jax.random.key(i))
        state, _ = update(state, exp, None, jax.random.key(10 + i))
        r, m = _returns(exp)
        used = r.mean() if baseline is None else baseline  # the first batch's mean at first
        np.testing.assert_allclose(exp.advantages, (r - used)[:, None] * m, rtol=1e-5, atol=1e-5)
        baseline = 0.5 * used + 0.5 * r.mean()
        np.testing.assert_allclose(state.advantage_state["baseline"], baseline, rtol=1e-5)
    assert int(state.advantage_state["seen"]) == 2


def test_a_stateful_estimator_keeps_the_contract():
    check_part("advantage", moving_baseline)


@register_advantage("test_state_of_another_shape", state=lambda: jnp.zeros((2,)))
def wrong_shape(batch):
    mask = batch["response_mask"]
    return AdvantageOut(mask * 0.0, None, {}, jnp.zeros((3,)))


@register_advantage("test_undeclared_state")
def undeclared(batch):
    mask = batch["response_mask"]
    return AdvantageOut(mask * 0.0, None, {}, jnp.zeros(()))


@pytest.mark.parametrize(
    "name,message",
    [
        ("test_state_of_another_shape", "returned state ((3,), dtype('float32')); it must match"),
        ("test_undeclared_state", "returned a state but declares none"),
    ],
)
def test_a_bad_state_is_one_line_at_load_naming_the_estimator(name, message):
    with pytest.raises(RlhfJaxError) as e:
        RLAlgorithm.from_config(PPOConfig(advantage=name))
    assert str(e.value).startswith(f"advantage estimator {name!r} ") and message in str(e.value)
    assert "\n" not in str(e.value)
