"""The RL steps built from parts: groups of samples, critic-free estimators, the KL in the
loss or nowhere, a reward function's scores, top-k/top-p sampling, and exact accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from synthetic_experience import experience_from_masks
from tiny import tiny_model

from rlhf_jax.config import OptimConfig, PPOConfig
from rlhf_jax.losses import get_loss
from rlhf_jax.models import init_scalar_head
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    TrainState,
    init_rl_state,
    make_experience_fn,
    make_finish_fn,
    make_optimizer,
    make_sample_fn,
    make_update_fn,
)

OPTIM = OptimConfig(lr=1e-2, grad_clip=0.0, eps=1e-4)


def setup(**changes):
    config, params = tiny_model(n_layers=1)
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    settings = dict(
        rollout_batch=8,
        minibatch_size=8,
        epochs=1,
        max_new_tokens=5,
        ema_decay=0.0,
        policy_optim=OPTIM,
        value_optim=OPTIM,
    )
    ppo = PPOConfig(**(settings | changes))
    algo = RLAlgorithm.from_config(ppo)
    critic = rm if algo.needs_critic else None
    tx = make_optimizer(ppo.policy_optim, 4)
    state = init_rl_state(params, critic, tx, tx if critic else None, ppo)
    frozen = Frozen(params if algo.uses_reference else None, rm)
    rng = np.random.default_rng(0)
    p = ppo.episodes // ppo.samples_per_prompt
    ids = rng.integers(3, 61, (p, 4)).astype(np.int32)
    mask = np.ones((p, 4), np.float32)
    mask[:1, :2] = 0
    return config, ppo, algo, state, frozen, ids * (mask > 0), mask


def run(config, ppo, algo, state, frozen, ids, mask, grad_accum=1, exp=None, ptx=None):
    critic_cfg = config if algo.needs_critic else None
    if exp is None:
        exp_fn = jax.jit(make_experience_fn(config, critic_cfg, config, ppo, algo, (2,), 0))
        exp, exp_metrics = exp_fn(state, frozen, ids, mask, jax.random.key(0))
    ptx_parts = (get_loss("ptx"), 1.0) if ptx is not None else ()
    update = jax.jit(
        make_update_fn(config, critic_cfg, ppo, algo, *ptx_parts, grad_accum=grad_accum)
    )
    new_state, metrics = update(state, exp, ptx, jax.random.key(1))
    return exp, new_state, metrics


def test_groups_of_samples_share_a_prompt_and_an_id():
    config, ppo, algo, state, frozen, ids, mask = setup(
        rollout_batch=2, samples_per_prompt=4, advantage="grpo", kl_penalty="loss"
    )
    exp, _, _ = run(config, ppo, algo, state, frozen, ids, mask)
    np.testing.assert_array_equal(exp.group_ids, [0, 0, 0, 0, 1, 1, 1, 1])
    prompts = np.asarray(exp.sequence_ids)[:, :4]
    np.testing.assert_array_equal(prompts, np.repeat(ids, 4, axis=0))
    responses = {tuple(r) for r in np.asarray(exp.response_ids)}
    assert len(responses) > 2  # the samples of a group differ (fresh randomness per row)
    # GRPO advantages sum to ~0 within each group (mean-centred) on each sequence
    first = np.asarray(exp.advantages)[:, 0]
    np.testing.assert_allclose(first.reshape(2, 4).sum(1), 0.0, atol=1e-4)


def test_critic_free_and_reference_free():
    """RLOO without a KL term: no critic in the state, no reference weights, no values,
    returns, reference log-probs or KL anywhere."""
    config, ppo, algo, state, frozen, ids, mask = setup(
        rollout_batch=2, samples_per_prompt=4, advantage="rloo", kl_penalty="none"
    )
    assert not algo.needs_critic and state.critic is None
    assert frozen.ref is None and not algo.uses_reference
    exp, new_state, metrics = run(config, ppo, algo, state, frozen, ids, mask)
    assert exp.values is None and exp.returns is None and new_state.critic is None
    assert exp.ref_logprobs is None and exp.kl is None
    assert not [k for k in metrics if k.startswith("ppo/value") or k.startswith("objective/kl")]
    assert "ppo/kl_loss" not in metrics
    assert int(new_state.policy.step) == 1


def test_kl_in_the_loss_is_beta_times_k3_added_to_the_policy_loss():
    config, ppo, algo, state, frozen, ids, mask = setup(
        rollout_batch=2, samples_per_prompt=4, advantage="grpo", kl_penalty="loss", beta=0.3
    )
    assert algo.kl_estimator == "k3"
    exp, _, metrics = run(config, ppo, algo, state, frozen, ids, mask)
    # policy == reference before the update: k3 of identical log-probs is 0
    np.testing.assert_allclose(metrics["ppo/kl_loss"], 0.0, atol=1e-6)
    total = metrics["ppo/policy/loss"] + 0.3 * metrics["ppo/kl_loss"]
    np.testing.assert_allclose(metrics["ppo/loss/total"], total, rtol=1e-6)
    # the KL is not in the reward: rewards are the scores on the last tokens only
    np.testing.assert_allclose(np.asarray(exp.rewards).sum(1), exp.scores, rtol=1e-6)
    # with a moved policy the KL term is positive and reaches the loss
    moved = state.replace(
        policy=state.policy.replace(params=jax.tree.map(lambda w: w * 1.1, state.policy.params))
    )
    _, _, metrics = run(config, ppo, algo, moved, frozen, ids, mask, exp=exp)
    assert float(metrics["ppo/kl_loss"]) > 1e-4


def test_a_reward_functions_scores_replace_the_reward_model():
    config, ppo, algo, state, _, ids, mask = setup(
        rollout_batch=2, samples_per_prompt=4, advantage="grpo", missing_eos_penalty=None
    )
    sample = jax.jit(make_sample_fn(config, ppo, (2,), 0))
    finish = jax.jit(make_finish_fn(config, None, None, ppo, algo, (2,)))
    rollout = sample(state.policy.params, ids, mask, jax.random.key(0))
    scores = jnp.arange(8, dtype=jnp.float32)
    exp, metrics = finish(state, Frozen(state.policy.params, None), rollout, scores)
    np.testing.assert_allclose(exp.scores, scores)
    np.testing.assert_allclose(metrics["objective/scores"], 3.5)
    # within each group the scores rise with the index: so do the advantages
    first = np.asarray(exp.advantages)[:, 0].reshape(2, 4)
    assert np.all(np.diff(first, axis=1) > 0)


def test_the_trainer_recomputes_the_samplers_log_probs_under_top_k_top_p():
    """Zero rollout/trainer mismatch: on the first minibatch, before any update, the trainer's
    log-probs equal the sampler's, also with temperature, top-k and top-p truncation (the
    default sampling is checked on every iteration of the CLI runs)."""
    config, ppo, algo, state, frozen, ids, mask = setup(top_k=5, top_p=0.8, temperature=0.7)
    exp, _, metrics = run(config, ppo, algo, state, frozen, ids, mask)
    assert float(metrics["rollout/logprob_mismatch_max"]) < 1e-5
    assert float(metrics["ppo/policy/approxkl"]) < 1e-10
    # every sampled token is among the 5 most likely: the truncated entropy is below log 5
    assert float(metrics["ppo/policy/entropy"]) < np.log(5) + 1e-5


def _unequal_ptx_batch(length=7, seed=1):
    """One pretraining batch [epochs 1, minibatches 1, 4, length] whose rows score 6, 1, 5 and
    2 tokens (right padding): the micro-batches (rows 0, 2 and 1, 3) hold 11 and 3."""
    rng = np.random.default_rng(seed)
    real = (np.arange(length)[None] < np.array([[7], [2], [6], [3]])).astype(np.float32)
    ids = rng.integers(3, 61, (4, length)).astype(np.int32) * (real > 0)
    return {"input_ids": ids[None, None], "attention_mask": real[None, None]}


def _synthetic_experience(algo, b=8, p=4, n=5, seed=0):
    """An Experience of random tokens whose responses have uneven lengths: the strided
    micro-batches of the update (rows j, j + 2, ...) hold different numbers of tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.array([5, 1, 5, 1, 5, 2, 2, 1])
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)

    seq_mask = np.concatenate([np.ones((b, p), np.float32), mask], axis=1)
    seq_ids, response_ids = rng.integers(3, 61, (b, p + n)), rng.integers(3, 61, (b, n))
    return experience_from_masks(algo, rng, seq_ids, seq_mask, response_ids, mask)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # PPO with a critic: the value loss is normalised globally too
        {"loss_reduction": "seq_mean_token_mean", "advantage": "grpo", "samples_per_prompt": 2},
        {"loss_reduction": "seq_mean_token_sum_norm", "advantage": "dr_grpo",
         "samples_per_prompt": 2, "kl_penalty": "loss"},
        {"ptx": True},  # the pretraining term: 4 rows of 6, 1, 5 and 2 scored tokens
    ],
)  # fmt: skip
def test_accumulating_unequal_micro_batches_equals_the_whole_minibatch(changes):
    """The gradient (plain SGD, lr 1: the weight change is minus the gradient) and the
    metrics of two micro-batches holding 17 and 5 tokens (and, with ptx, 11 and 3 pretraining
    tokens) equal the whole minibatch's."""
    ptx = _unequal_ptx_batch() if changes.pop("ptx", False) else None
    changes = {"rollout_batch": 8 // changes.get("samples_per_prompt", 1), **changes}
    config, ppo, algo, state, frozen, ids, mask = setup(**changes)
    sgd = optax.sgd(1.0)
    state = state.replace(policy=TrainState.create(state.policy.params, sgd))
    if state.critic is not None:
        state = state.replace(critic=TrainState.create(state.critic.params, sgd))
    exp = _synthetic_experience(algo)
    micro = dataclasses.replace(ppo, policy_optim=dataclasses.replace(OPTIM, grad_accum=2))
    _, whole, m1 = run(config, ppo, algo, state, frozen, ids, mask, exp=exp, ptx=ptx)
    _, accum, m2 = run(
        config, micro, algo, state, frozen, ids, mask, grad_accum=2, exp=exp, ptx=ptx
    )
    assert set(m2) == set(m1) and ("ppo/ptx/loss" in m1) == (ptx is not None)
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for name in ("policy", "critic") if algo.needs_critic else ("policy",):
        before = getattr(state, name).params
        step_whole = jax.tree.map(jnp.subtract, getattr(whole, name).params, before)
        step_accum = jax.tree.map(jnp.subtract, getattr(accum, name).params, before)
        assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(step_whole)) > 1e-3
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            step_accum,
            step_whole,
        )


def test_a_part_metric_that_clashes_with_another_writer_is_an_error():
    """A fork's policy loss returning a name the update writes itself (or the value loss
    writes) would silently replace that number in metrics.jsonl; tracing the update says so."""
    from rlhf_jax.errors import RlhfJaxError
    from rlhf_jax.metrics import merged_metrics
    from rlhf_jax.types import LossOut

    config, ppo, algo, state, frozen, ids, mask = setup()
    exp = _synthetic_experience(algo)
    default = algo.policy_loss

    def clashing(name):
        def loss(outputs, batch):
            out = default(outputs, batch)
            return LossOut(out.loss, {**out.metrics, name: out.loss})

        return loss

    for name, writer in [
        ("ppo/loss/total", "the RL update itself"),
        ("ppo/value/loss", "the value loss (ppo.value_loss)"),
    ]:
        forked = dataclasses.replace(algo, policy_loss=clashing(name))
        update = make_update_fn(config, config, ppo, forked)
        with pytest.raises(RlhfJaxError) as e:
            jax.eval_shape(update, state, exp, None, jax.random.key(1))
        assert str(e.value) == (
            f"metric {name!r} is written by both the policy loss (ppo.policy_loss) and "
            f"{writer}; one would overwrite the other in metrics.jsonl: rename the part's metric"
        )
    assert merged_metrics(("a", {"x/y": 1}), ("b", {"x/z": 2})) == {"x/y": 1, "x/z": 2}
