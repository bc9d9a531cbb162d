"""`ppo.experience_micro_batch`: the experience's forwards (reference, reward model, critic) in
micro-batches give the whole-batch experience; a size that does not divide is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_model

from rlhf_jax.config import Config, OptimConfig, PPOConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import init_scalar_head
from rlhf_jax.steps import Frozen, RLAlgorithm, init_rl_state, make_experience_fn, make_optimizer


@pytest.mark.parametrize(
    "changes",
    [{"top_k": 6}, {"critic": "shared_trunk", "kl_penalty": "loss"}],
    ids=["critic-top_k", "shared_trunk"],
)
def test_micro_batched_experience_equals_the_whole_batch(changes):
    config, params = tiny_model(n_layers=1)
    ppo = PPOConfig(
        rollout_batch=4, samples_per_prompt=2, minibatch_size=8, max_new_tokens=5,
        temperature=0.8, ema_decay=0.0, policy_optim=OptimConfig(), **changes,
    )  # fmt: skip
    algo = RLAlgorithm.from_config(ppo)
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    policy, critic = params, rm
    if algo.shared_critic:
        policy, critic = {**params, "value_head": rm["head"]}, None
    tx = make_optimizer(ppo.policy_optim, 4)
    state = init_rl_state(policy, critic, tx, tx if critic else None, ppo)
    frozen = Frozen(params, rm)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 61, (4, 4)), jnp.int32)
    mask = jnp.asarray(np.arange(4)[None] >= np.array([[0], [2], [0], [1]]), jnp.float32)
    critic_cfg = config if critic is not None else None
    out = {}
    for rows in (0, 2):
        p = dataclasses.replace(ppo, experience_micro_batch=rows)
        fn = jax.jit(make_experience_fn(config, critic_cfg, config, p, algo, (2,), 0))
        out[rows] = fn(state, frozen, ids, mask, jax.random.key(0))
    (whole, m_whole), (micro, m_micro) = out[0], out[2]
    np.testing.assert_array_equal(micro.response_ids, whole.response_ids)
    for name in ("ref_logprobs", "values", "scores", "advantages", "rewards"):
        np.testing.assert_allclose(
            getattr(micro, name), getattr(whole, name), rtol=1e-5, atol=1e-5, err_msg=name
        )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), m_micro,
                 m_whole)  # fmt: skip


def test_a_micro_batch_that_does_not_divide_the_responses_is_refused():
    with pytest.raises(RlhfJaxError, match="ppo.experience_micro_batch"):
        Config(ppo=PPOConfig(rollout_batch=6, minibatch_size=6, experience_micro_batch=4))
