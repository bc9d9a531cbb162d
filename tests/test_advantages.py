"""Every advantage estimator against a plain Python loop: unequal lengths, padding with
garbage, a group whose scores are all equal, and G = 1."""

import math

import numpy as np
import pytest

from rlhf_jax import registry
from rlhf_jax.advantages import get_advantage
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.ops import gae_advantages

T = 5
# Two groups of three (the second with equal scores), then a singleton group.
GROUPS = np.array([0, 0, 0, 1, 1, 1, 2], np.int32)
LENGTHS = [5, 1, 3, 2, 4, 5, 3]
SCORES = np.array([1.0, -0.5, 2.0, 0.7, 0.7, 0.7, 3.0], np.float32)


def _batch(kl_in_reward: bool = True):
    rng = np.random.default_rng(0)
    b = len(LENGTHS)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.float32)
    rewards = np.zeros((b, T), np.float32)
    if kl_in_reward:  # -beta * KL_t on every token
        rewards -= 0.1 * np.abs(rng.normal(size=(b, T))).astype(np.float32)
    rewards[np.arange(b), np.array(LENGTHS) - 1] += SCORES
    rewards = np.where(mask > 0, rewards, np.nan)  # garbage on padding
    values = np.where(mask > 0, rng.normal(size=(b, T)), 1e9).astype(np.float32)
    return {
        "rewards": rewards,
        "response_mask": mask,
        "scores": SCORES,
        "group_ids": GROUPS,
        "values": values,
    }


def _returns(batch):
    """R_i = sum of the real per-token rewards."""
    return [sum(float(batch["rewards"][i, t]) for t in range(n)) for i, n in enumerate(LENGTHS)]


def _members(i):
    return [j for j in range(len(GROUPS)) if GROUPS[j] == GROUPS[i]]


def _broadcast(per_seq):
    out = np.zeros((len(LENGTHS), T))
    for i, n in enumerate(LENGTHS):
        out[i, :n] = per_seq[i]
    return out


def _whiten(x):
    """Over every real token of the batch, biased variance (as masked_whiten)."""
    vals = [x[i, t] for i, n in enumerate(LENGTHS) for t in range(n)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    out = np.zeros_like(x)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            out[i, t] = (x[i, t] - mean) / math.sqrt(var + 1e-8)
    return out


def _reward_to_go(rewards, gamma=1.0):
    out = np.zeros((len(LENGTHS), T))
    for i, n in enumerate(LENGTHS):
        running = 0.0
        for t in reversed(range(n)):
            running = float(rewards[i, t]) + gamma * running
            out[i, t] = running
    return out


def _check(name, want, **hparams):
    out = get_advantage(name, **hparams)(_batch())
    np.testing.assert_allclose(np.asarray(out.advantages), want, rtol=1e-5, atol=1e-5)
    return out


def test_grpo():
    r = _returns(_batch())
    want = []
    for i in range(len(r)):
        g = [r[j] for j in _members(i)]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1)) if len(g) > 1 else 0.0
        want.append((r[i] - mean) / (std + 1e-6))
    out = _check("grpo", _broadcast(want))
    assert out.returns is None
    # the singleton group (G = 1) has no baseline to compare with: advantage 0
    assert np.all(np.asarray(out.advantages)[6] == 0)


def test_equal_scores_without_kl_give_zero_advantage():
    batch = _batch(kl_in_reward=False)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = np.asarray(get_advantage(name)(batch).advantages)
        assert np.all(adv[3:6] == 0), name  # the group whose three scores are equal


def test_dr_grpo():
    r = _returns(_batch())
    want = [r[i] - sum(r[j] for j in _members(i)) / len(_members(i)) for i in range(len(r))]
    _check("dr_grpo", _broadcast(want))


def test_rloo():
    r = _returns(_batch())
    want = []
    for i in range(len(r)):
        others = [r[j] for j in _members(i) if j != i]
        want.append(r[i] - sum(others) / len(others) if others else 0.0)
    _check("rloo", _broadcast(want))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp(gamma):
    batch = _batch()
    _check("reinforce_pp", _whiten(_reward_to_go(batch["rewards"], gamma)), gamma=gamma)


def test_reinforce_pp_baseline():
    batch = _batch()
    rewards = np.nan_to_num(batch["rewards"].copy())
    for i, n in enumerate(LENGTHS):
        mean = sum(float(SCORES[j]) for j in _members(i)) / len(_members(i))
        rewards[i, n - 1] -= mean
    _check("reinforce_pp_baseline", _whiten(_reward_to_go(rewards)))


def test_gae_is_the_ops_function_whitened():
    batch = _batch()
    out = get_advantage("gae", gamma=0.99, lam=0.9)(batch)
    clean = {k: np.nan_to_num(v, nan=0.0) for k, v in batch.items()}
    adv, ret = gae_advantages(clean["rewards"], clean["values"], batch["response_mask"], 0.99, 0.9)
    np.testing.assert_allclose(out.advantages, _whiten(np.asarray(adv)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.returns, ret, rtol=1e-5, atol=1e-5)
    raw = get_advantage("gae", whiten=False)(batch).advantages
    assert not np.allclose(raw, out.advantages)


def test_declared_facts():
    facts = {name: registry.info(registry.lookup("advantage", name)) for name in ["gae", "grpo"]}
    assert facts["gae"]["needs_critic"] and facts["gae"]["min_group_size"] == 1
    assert not facts["grpo"]["needs_critic"] and facts["grpo"]["min_group_size"] == 2
    assert registry.info(registry.lookup("advantage", "reinforce_pp"))["min_group_size"] == 1


def test_unknown_estimator_lists_the_available_ones():
    with pytest.raises(RlhfJaxError, match="unknown advantage estimator 'gpro'") as e:
        get_advantage("gpro")
    for name in ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert name in str(e.value)
    with pytest.raises(RlhfJaxError, match="does not take lamda"):
        get_advantage("gae", lamda=0.9)
