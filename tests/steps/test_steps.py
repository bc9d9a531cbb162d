"""Step functions: accumulation equals a full batch, RM learns rankings, PPO's first update
starts exactly at the rollout policy, the KL controller and the ptx term act in compiled code."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
    make_optimizer,
    make_preference_step,
    make_reward_step,
    make_sft_step,
    make_update_fn,
)
from rlhf_jax.steps.optim import make_clipped_adamw


def sft_batch(n=4, t=8, vocab=61, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.float32)
    loss_mask = np.zeros((n, t), np.float32)
    loss_mask[:, 3:] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def unequal_sft_batch(vocab=61, seed=0):
    """4 rows of 10, 2, 7 and 1 target tokens: the strided micro-batches of grad_accum=2
    (rows 0, 2 and 1, 3) hold 17 and 3 (a mean of their means is 43% off the batch's)."""
    batch = sft_batch(n=4, t=12, vocab=vocab, seed=seed)
    batch["loss_mask"] = (np.arange(12)[None] >= np.array([[2], [10], [5], [11]])).astype(
        np.float32
    )
    return batch


def sgd_step(step, params, batch):
    """`(weight change, metrics)` of one plain SGD step with lr 1: the change is minus the
    gradient."""
    state, metrics = jax.jit(step)(TrainState.create(params, optax.sgd(1.0)), batch, None)
    return jax.tree.map(jnp.subtract, state.params, params), metrics


def assert_same_step(got, want):
    """Same gradient and same metrics (the whole batch's) as the reference step."""
    (update, metrics), (want_update, want_metrics) = got, want
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(want_update)) > 1e-3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), update, want_update
    )
    assert set(metrics) == set(want_metrics)
    for key in want_metrics:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


def test_gradient_accumulation_equals_full_batch():
    config, params = tiny_model()
    batch = unequal_sft_batch()
    outs = [
        sgd_step(make_sft_step(config, get_loss("sft"), grad_accum=accum), params, batch)
        for accum in (1, 2, 4)
    ]
    assert float(outs[0][1]["sft/tokens"]) == 20
    for out in outs[1:]:
        assert_same_step(out, outs[0])


def ranking_batch(seed=0):
    """4 prompts of K = 5 with 10, 1, 2 and 1 ranked pairs (a tie, padded completions): the
    micro-batches of grad_accum=2 hold 12 and 2 pairs."""
    rng = np.random.default_rng(seed)
    b, k, length = 4, 5, 6
    completion_mask = (np.arange(k)[None] < np.array([[5], [2], [3], [2]])).astype(np.float32)
    rank = np.array([[0, 1, 2, 3, 4], [1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]])
    return {
        "input_ids": rng.integers(3, 61, (b, k, length)).astype(np.int32),
        "attention_mask": np.ones((b, k, length), np.float32),
        "completion_mask": completion_mask,
        "rank": rank.astype(np.int32),
        "completion_start": np.array([2, 3, 1, 2], np.int32),
        "ref_logps": (-rng.uniform(8, 16, (b, k))).astype(np.float32),
    }


@pytest.mark.parametrize(
    "kind,name,kwargs",
    [("reward", "pairwise_mean", {}), ("preference", "dpo", {"beta": 0.5, "weighting": "pair"})],
)
def test_reward_and_preference_steps_accumulate_exactly(kind, name, kwargs):
    """pairwise_mean and DPO's pair weighting average over every pair of the whole batch,
    also over micro-batches of 12 and 2 pairs (averaging their means was 88% / 33% off)."""
    config, trunk = tiny_model(n_layers=1)
    if kind == "reward":
        params = {"trunk": trunk, "head": init_scalar_head(config, jax.random.key(1))}
        make = make_reward_step
    else:
        params, make = trunk, make_preference_step
    loss_fn = get_loss(kind, name, **kwargs)
    outs = [
        sgd_step(make(config, loss_fn, grad_accum=accum), params, ranking_batch())
        for accum in (1, 2)
    ]
    assert float(outs[0][1]["rm/pairs" if kind == "reward" else "dpo/pairs"]) == 14
    assert_same_step(outs[1], outs[0])


def test_sft_step_lowers_the_loss():
    config, params = tiny_model()
    step = jax.jit(make_sft_step(config, get_loss("sft")))
    state = TrainState.create(params, make_optimizer(OptimConfig(lr=3e-3), 30))
    batch = sft_batch()
    losses = []
    for i in range(30):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["sft/loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30 and float(m["train/skipped_updates"]) == 0


def test_non_finite_gradients_skip_the_update():
    config, params = tiny_model()
    step = jax.jit(make_sft_step(config, get_loss("sft")))
    state = TrainState.create(params, make_optimizer(OptimConfig(lr=1e-2), 5))
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
    bad_state = state.replace(params=poisoned)
    new_state, m = step(bad_state, sft_batch(), jax.random.key(0))
    assert float(m["train/skipped_updates"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_state.params, poisoned)


def test_reward_step_learns_a_ranking():
    config, trunk = tiny_model()
    params = {"trunk": trunk, "head": init_scalar_head(config, jax.random.key(1))}
    rng = np.random.default_rng(0)
    b, k, length = 4, 3, 6
    ids = rng.integers(3, 61, (b, k, length)).astype(np.int32)
    ids[:, 0, -1] = 7  # the best completion of every prompt ends in token 7
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones((b, k, length), np.float32),
        "completion_mask": np.ones((b, k), np.float32),
        "rank": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
    }
    step = jax.jit(make_reward_step(config, get_loss("reward")))
    state = TrainState.create(params, make_optimizer(OptimConfig(lr=3e-3), 40))
    for i in range(40):
        state, m = step(state, batch, jax.random.key(i))
    assert float(m["rm/accuracy"]) == 1.0 and float(m["rm/loss"]) < 0.3


def experience_fn(config, ppo, eos=(2,)):
    return make_experience_fn(config, config, config, ppo, RLAlgorithm.from_config(ppo), eos, 0)


def ppo_setup(**ppo_changes):
    config, params = tiny_model()
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    settings = dict(rollout_batch=8, minibatch_size=4, epochs=1, max_new_tokens=5, ema_decay=0.0)
    ppo = PPOConfig(**(settings | ppo_changes))
    state = init_rl_state(
        params, rm, make_optimizer(ppo.policy_optim, 4), make_optimizer(ppo.value_optim, 4), ppo
    )
    frozen = Frozen(params, rm)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 61, (8, 4)).astype(np.int32)
    mask = np.ones((8, 4), np.float32)
    mask[:3, :2] = 0
    return config, ppo, state, frozen, ids * (mask > 0), mask


def test_experience_at_init_has_zero_kl_and_score_on_last_token():
    config, ppo, state, frozen, ids, mask = ppo_setup()
    exp_fn = jax.jit(experience_fn(config, ppo))
    exp, metrics = exp_fn(state, frozen, ids, mask, jax.random.key(0))
    # policy == reference: the rollout's log-probs equal the reference's teacher-forced ones
    np.testing.assert_allclose(exp.logprobs, exp.ref_logprobs, atol=1e-5)
    assert abs(float(metrics["objective/kl"])) < 1e-4
    last = np.asarray(exp.response_mask).sum(1).astype(int) - 1
    rewards = np.asarray(exp.rewards)
    np.testing.assert_allclose(rewards[np.arange(8), last], exp.scores, atol=1e-4)


def test_first_update_starts_at_the_rollout_policy():
    config, ppo, state, frozen, ids, mask = ppo_setup(minibatch_size=8)
    exp_fn = jax.jit(experience_fn(config, ppo))
    update = jax.jit(make_update_fn(config, config, ppo, RLAlgorithm.from_config(ppo)))
    exp, _ = exp_fn(state, frozen, ids, mask, jax.random.key(0))
    _, metrics = update(state, exp, None, jax.random.key(1))
    # one epoch, one minibatch: the ratio is exactly 1 before the update (one numerics path)
    assert float(metrics["ppo/policy/approxkl"]) < 1e-9
    assert float(metrics["ppo/policy/clipfrac"]) == 0.0


def test_adaptive_kl_moves_beta_and_ptx_enters_the_loss():
    config, ppo, state, frozen, ids, mask = ppo_setup(
        adaptive_kl=True, kl_target=100.0, kl_horizon=10
    )
    exp_fn = jax.jit(experience_fn(config, ppo))
    update = jax.jit(
        make_update_fn(config, config, ppo, RLAlgorithm.from_config(ppo), get_loss("ptx"), 2.0)
    )
    rng = np.random.default_rng(1)
    ptx = {
        "input_ids": rng.integers(3, 61, (1, 2, 4, 6)).astype(np.int32),
        "attention_mask": np.ones((1, 2, 4, 6), np.float32),
    }
    beta0 = float(state.beta)
    for it in range(2):
        exp, _ = exp_fn(state, frozen, ids, mask, jax.random.key(it))
        state, metrics = update(state, exp, ptx, jax.random.key(10 + it))
    # KL far below the target: the error clips at -0.2, so each update multiplies beta by
    # 1 - 0.2 * n_steps / horizon = 1 - 0.2 * 8 / 10 = 0.84 (Ziegler et al. 2019).
    np.testing.assert_allclose(float(state.beta), beta0 * 0.84**2, rtol=1e-6)
    total = (
        metrics["ppo/policy/loss"]
        + ppo.vf_coef * metrics["ppo/value/loss"]
        + 2.0 * metrics["ppo/ptx/loss"]
    )
    np.testing.assert_allclose(metrics["ppo/loss/total"], total, rtol=1e-5)


def test_responses_without_eos_get_the_fixed_score_or_the_penalty():
    config, ppo, state, frozen, ids, mask = ppo_setup()
    no_eos = ()  # nothing ever stops: every response runs to max_new_tokens without EOS

    def experience(**changes):
        changed = dataclasses.replace(ppo, **changes)
        algo = RLAlgorithm.from_config(changed)
        return jax.jit(make_experience_fn(config, config, config, changed, algo, no_eos, 0))

    plain = experience(missing_eos_penalty=None)
    fixed = experience(missing_eos_score=-3.0)
    penalised = experience(missing_eos_penalty=2.0)
    key = jax.random.key(0)
    raw = plain(state, frozen, ids, mask, key)[0].scores
    np.testing.assert_allclose(fixed(state, frozen, ids, mask, key)[0].scores, -3.0)
    np.testing.assert_allclose(
        penalised(state, frozen, ids, mask, key)[0].scores, np.asarray(raw) - 2.0, rtol=1e-6
    )


def test_packed_rows_equal_the_same_examples_unpacked():
    """Sequence packing: segment-masked attention and per-segment positions make a packed
    row's logits and SFT loss those of its examples run one per row."""
    from rlhf_jax.data import SFTExample, encode_sft
    from rlhf_jax.models import forward
    from rlhf_jax.tasks.tokenizer import train_tokenizer

    tok = train_tokenizer(["the red fox runs near the river. a calm owl sings."] * 30, 120)
    config, params = tiny_model(vocab_size=len(tok))
    examples = [
        SFTExample("the red fox", " runs."),
        SFTExample("a calm", " owl sings."),
        SFTExample("the owl", " runs near the river."),
    ]
    plain = encode_sft(examples, tok, max_len=32)
    packed = encode_sft(examples, tok, max_len=48, pack=True)
    assert packed["input_ids"].shape[0] < len(examples)
    eval_fn = jax.jit(make_sft_step(config, get_loss("sft")))
    tx = make_optimizer(OptimConfig(lr=0.0, grad_clip=0.0), 1)
    _, m_plain = eval_fn(TrainState.create(params, tx), plain, jax.random.key(0))
    _, m_packed = eval_fn(TrainState.create(params, tx), packed, jax.random.key(0))
    np.testing.assert_allclose(m_packed["sft/loss"], m_plain["sft/loss"], rtol=1e-5)
    assert float(m_packed["sft/tokens"]) == float(m_plain["sft/tokens"])
    logits_packed = forward(
        config, params, packed["input_ids"], packed["attention_mask"], packed["segment_ids"]
    )
    logits_plain = forward(config, params, plain["input_ids"], plain["attention_mask"])
    row, seg = packed["segment_ids"], 2  # second example sits in row 0 as segment 2
    at = np.flatnonzero(row[0] == seg)
    n = int(plain["attention_mask"][1].sum())
    np.testing.assert_allclose(logits_packed[0, at], logits_plain[1, :n], atol=1e-5)


def test_a_non_finite_update_from_finite_gradients_is_skipped_too():
    """Adam with eps = 0 turns a zero gradient into 0/0: the gradients are finite, the update
    is not. It is skipped and counted like a NaN gradient, and the weights stay finite."""
    tx = make_optimizer(OptimConfig(lr=1e-3, eps=0.0, grad_clip=0.0), 10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.zeros(3)}, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)  # Adam's state was kept
    np.testing.assert_allclose(updates["w"], -1e-3, rtol=1e-3)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1


@pytest.mark.parametrize("mu_dtype", [None, "bfloat16"])
def test_the_non_finite_guard_needs_no_more_memory_than_the_update_it_guards(mu_dtype):
    """Compiled alone, a guarded AdamW update (clipping on, the state donated) holds at most
    1.2x the weights in temporaries in float32, and little more than the unguarded update with
    a bf16 first moment: the guard only reduces before it writes and never keeps an old and a
    new optimizer state side by side (it used to: 3.5x the weights against 1.0x)."""
    cfg = OptimConfig(lr=1e-3, grad_clip=1.0, mu_dtype=mu_dtype)
    params = {f"w{i}": jax.ShapeDtypeStruct((256, 1024), jnp.float32) for i in range(4)}
    weights = 4 * 256 * 1024 * 4

    def update_temps(tx) -> int:
        state = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
        apply = jax.jit(lambda ts, g: ts.apply_gradients(g), donate_argnums=0)
        return apply.lower(state, params).compile().memory_analysis().temp_size_in_bytes

    guarded = update_temps(make_optimizer(cfg, 10))
    unguarded = update_temps(make_clipped_adamw(cfg, 10))
    assert guarded <= unguarded + 0.3 * weights, (guarded / weights, unguarded / weights)
    if mu_dtype is None:
        assert guarded <= 1.2 * weights, guarded / weights
