"""`ppo.trim_update`: the RL update on the experience cut to its real columns (length
buckets) equals the update on the whole padded experience, and the cut never drops a real
token."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from synthetic_experience import experience_from_masks
from test_rl import OPTIM, setup

from rlhf_jax.config import DEFAULT_RULES, MeshConfig, PPOConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.trimmed_update import TrimmedUpdate
from rlhf_jax.sharding import jit_update, make_mesh, state_shardings
from rlhf_jax.steps import RLAlgorithm, TrainState, make_update_fn
from rlhf_jax.steps.rl_trim import bucket, trim_experience, trimmed_lengths


def _padded_experience(algo, b, p, n, prompt_lens, response_lens, seed=0):
    """Left-padded prompts of `prompt_lens` real tokens and responses of `response_lens`,
    in columns of `p` + `n`; every per-token array zero where the mask is."""
    rng = np.random.default_rng(seed)
    prompt_mask = (np.arange(p)[None] >= p - np.asarray(prompt_lens)[:, None]).astype(np.float32)
    mask = (np.arange(n)[None] < np.asarray(response_lens)[:, None]).astype(np.float32)
    seq_mask = np.concatenate([prompt_mask, mask], axis=1)
    seq_ids = rng.integers(3, 61, (b, p + n)) * (seq_mask > 0)

    return experience_from_masks(algo, rng, seq_ids, seq_mask, seq_ids[:, p:], mask)


@pytest.mark.parametrize("per_doubling", [1, 2, 4, 8])
def test_bucket_is_the_next_of_its_steps_within_the_limit(per_doubling):
    """The buckets: each power of two 2^j and the whole numbers among 2^j (1 + i / k) for
    i < k (1: the powers of two; 2: ..., 4, 6, 8, 12, ...), listed naively."""
    k = per_doubling
    steps = sorted(
        {(2**j * (k + i)) // k for j in range(10) for i in range(k) if 2**j * i % k == 0}
    )
    for limit in (1, 5, 8, 24, 100, 256):
        for n in range(0, limit + 3):
            want = min(v for v in steps if v >= max(n, 1))
            assert bucket(n, limit, k) == min(want, limit), (n, limit, k)
    if k == 2:
        assert [bucket(n, 256, 2) for n in (5, 7, 9, 13, 17, 100)] == [6, 8, 12, 16, 24, 128]


@pytest.mark.parametrize("seed", range(6))
def test_trimming_keeps_every_real_token(seed):
    """Random left-padded prompts and responses (some rows empty): the trimmed experience
    holds every real token, and is exactly the padded arrays' kept columns."""
    rng = np.random.default_rng(seed)
    b, p, n = 6, 7, 11
    prompt_lens = rng.integers(0, p + 1, b)
    response_lens = rng.integers(0, n + 1, b) * (rng.random(b) < 0.8)
    algo = RLAlgorithm.from_config(PPOConfig(kl_penalty="loss"))
    exp = _padded_experience(algo, b, p, n, prompt_lens, response_lens, seed)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    update = TrimmedUpdate(None, mesh, DEFAULT_RULES)
    pc, nc = update.lengths(exp)
    assert (pc, nc) == trimmed_lengths((int(max(prompt_lens)), int(max(response_lens))), p, n)
    assert max(prompt_lens) <= pc <= p and max(response_lens) <= nc <= n
    cut = trim_experience(exp, pc, nc)
    for name in ("sequence_mask", "response_mask"):
        assert float(jnp.sum(getattr(cut, name))) == float(jnp.sum(getattr(exp, name)))
    seq = np.asarray(exp.sequence_ids)
    np.testing.assert_array_equal(cut.sequence_ids, seq[:, p - pc : p + nc])
    np.testing.assert_array_equal(cut.ref_logprobs, np.asarray(exp.ref_logprobs)[:, :nc])
    np.testing.assert_array_equal(cut.scores, exp.scores)


def _sgd_state(state):
    sgd = optax.sgd(0.5)
    state = state.replace(policy=TrainState.create(state.policy.params, sgd))
    if state.critic is not None:
        state = state.replace(critic=TrainState.create(state.critic.params, sgd))
    return state


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 2, "minibatch_size": 4},  # PPO with a critic, GAE
        {"advantage": "grpo", "samples_per_prompt": 2, "rollout_batch": 4,
         "kl_penalty": "loss", "policy_optim": OPTIM.__class__(lr=1e-2, grad_accum=2)},
    ],
)  # fmt: skip
def test_the_trimmed_update_equals_the_padded_one(changes):
    """The update through `TrimmedUpdate` (the loop's program: 3-token prompts in 6 columns,
    at most 3-token responses in 8) against the plain update on the whole experience: loss,
    metrics and new weights to rtol 1e-5, on a bucket of 4 + 4 columns. (Weights near zero
    get atol 1e-6: sums over 12 instead of 14 positions round differently, measured up to
    4.6e-7 on weights of scale 0.3.)"""
    config, ppo, algo, state, _, _, _ = setup(trim_update=True, **changes)
    state = _sgd_state(state)
    b = ppo.episodes
    exp = _padded_experience(algo, b, 6, 8, [3, 1, 2, 3, 1, 2, 3, 2], [3, 1, 2, 0, 3, 1, 2, 3])
    critic_cfg = config if algo.needs_critic else None
    grad_accum = ppo.policy_optim.grad_accum
    fn = make_update_fn(config, critic_cfg, ppo, algo, grad_accum=grad_accum)
    key = jax.random.key(3)
    want_state, want = jax.jit(fn)(state, exp, None, key)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    shardings = state_shardings(state, mesh)
    trimmed = TrimmedUpdate(
        jit_update(fn, shardings, mesh, DEFAULT_RULES, donate=False), mesh, DEFAULT_RULES
    )
    assert trimmed.lengths(exp) == (4, 4)
    got_state, got = trimmed(jax.device_put(state, shardings), exp, None, key)
    assert list(trimmed.programs) == [(4, 4)] and trimmed.peak_bytes() > 0
    assert set(got) == set(want) and "ppo/loss/total" in got
    if algo.needs_critic:
        assert "ppo/value/loss" in got
    else:
        assert "ppo/kl_loss" in got
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for name in ("policy", "critic") if algo.needs_critic else ("policy",):
        before = getattr(state, name).params
        new_want, new_got = getattr(want_state, name).params, getattr(got_state, name).params
        assert max(float(jnp.max(jnp.abs(a - w))) for a, w in zip(
            jax.tree.leaves(new_want), jax.tree.leaves(before))) > 1e-4  # fmt: skip
        jax.tree.map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
            new_got,
            new_want,
        )


def test_trimming_refuses_a_normaliser_that_is_the_padded_length():
    ppo = PPOConfig(
        trim_update=True,
        advantage="dr_grpo",
        samples_per_prompt=2,
        loss_reduction="seq_mean_token_sum_norm",
    )
    with pytest.raises(RlhfJaxError, match="ppo.trim_update"):
        RLAlgorithm.from_config(ppo)
