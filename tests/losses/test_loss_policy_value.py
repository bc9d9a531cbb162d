import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import clipped_value, ppo_clip, ppo_dual_clip, unclipped_value
from rlhf_jax.losses import policy as ppo_losses

# Five real tokens covering both clipping sides, then one padded token with garbage.
RATIOS = [1.5, 0.5, 0.5, 1.5, 1.1, 1.0]
ADV = [1.0, -1.0, 1.0, -1.0, 2.0, 1e6]


def _policy_case():
    old = jnp.array([[-1.0] * 6])
    logp = old + jnp.log(jnp.array([RATIOS]))
    logp = logp.at[0, 5].set(50.0)  # exp(50 - -1) would overflow if it were not masked
    batch = {
        "old_logprobs": old,
        "advantages": jnp.array([ADV]),
        "response_mask": jnp.array([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]),
    }
    return {"logprobs": logp, "entropy": jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 1e9]])}, batch


def test_ppo_clip_hand_values():
    outputs, batch = _policy_case()
    out = ppo_clip(outputs, batch, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A= 1, r=1.5: max(-1.5, -1.2) = -1.2  clipped (upper side)
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8  clipped (lower side)
    #   A= 1, r=0.5: max(-0.5, -0.8) = -0.5  not clipped
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5  not clipped
    #   A= 2, r=1.1: max(-2.2, -2.2) = -2.2  inside the range
    # mean = (-1.2 + 0.8 - 0.5 + 1.5 - 2.2) / 5 = -0.32
    np.testing.assert_allclose(out.loss, -0.32, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["ppo/policy/clipfrac"], 2 / 5)
    logs = [math.log(r) ** 2 for r in RATIOS[:5]]
    np.testing.assert_allclose(out.metrics["ppo/policy/approxkl"], 0.5 * sum(logs) / 5, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["ppo/policy/entropy"], 3.0)
    # Clipped tokens (0, 1) and the padded one get no gradient; the others get -A r / 5.
    g = jax.grad(lambda lp: ppo_clip({"logprobs": lp}, batch).loss)(outputs["logprobs"])
    want = [0.0, 0.0, -1.0 * 0.5 / 5, 1.0 * 1.5 / 5, -2.0 * 1.1 / 5, 0.0]
    np.testing.assert_allclose(g[0], want, rtol=1e-5, atol=1e-7)


def test_ppo_dual_clip_hand_values():
    old = jnp.zeros((1, 3))
    logp = jnp.log(jnp.array([[5.0, 5.0, 0.5]]))
    batch = {
        "old_logprobs": old,
        "advantages": jnp.array([[-1.0, 1.0, -1.0]]),
        "response_mask": jnp.ones((1, 3)),
    }
    out = ppo_dual_clip({"logprobs": logp}, batch, clip_eps=0.2, dual_clip=3.0)
    # A=-1, r=5: PPO term max(5, 1.2) = 5, capped at -c A = 3 -> 3
    # A= 1, r=5: max(-5, -1.2) = -1.2 (positive advantage: no cap)
    # A=-1, r=0.5: max(0.5, 0.8) = 0.8 < 3 -> 0.8
    np.testing.assert_allclose(out.loss, (3.0 - 1.2 + 0.8) / 3, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["ppo/policy/clipfrac"], 1.0)
    np.testing.assert_allclose(
        ppo_clip({"logprobs": logp}, batch).loss, (5.0 - 1.2 + 0.8) / 3, rtol=1e-5
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_clip_against_loop(seed):
    rng = np.random.default_rng(seed)
    b, t = 4, 6
    lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    old = -rng.random((b, t)).astype(np.float32) * 3
    logp = old + rng.normal(size=(b, t)).astype(np.float32) * 0.3
    adv = rng.normal(size=(b, t)).astype(np.float32)
    terms, clipped = [], []
    for i in range(b):
        for j in range(lengths[i]):
            r = math.exp(float(logp[i, j]) - float(old[i, j]))
            a = float(adv[i, j])
            u, c = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(u, c))
            clipped.append(c > u)
    batch = {"old_logprobs": old, "advantages": adv, "response_mask": mask}
    out = ppo_clip({"logprobs": logp}, batch, clip_eps=0.2)
    np.testing.assert_allclose(out.loss, np.mean(terms), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["ppo/policy/clipfrac"], np.mean(clipped), atol=1e-6)


def _value_case():
    return {"values": jnp.array([[0.5, 0.5, -0.5, 0.1, 7.0]])}, {
        "old_values": jnp.array([[0.0, 0.0, 0.0, 0.0, -7.0]]),
        "returns": jnp.array([[1.0, 0.0, -1.0, 0.3, 1e6]]),
        "response_mask": jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]]),
    }


def test_clipped_value_hand_values():
    outputs, batch = _value_case()
    out = clipped_value(outputs, batch, clip_range=0.2)
    # v_clip = old + clip(v - old, -0.2, 0.2) = [0.2, 0.2, -0.2, 0.1]
    #   v= 0.5, R= 1: max((0.5-1)^2, (0.2-1)^2)   = max(0.25, 0.64) = 0.64  clipped
    #   v= 0.5, R= 0: max(0.25, 0.04)             = 0.25
    #   v=-0.5, R=-1: max(0.25, (-0.2+1)^2=0.64)  = 0.64  clipped
    #   v= 0.1, R=0.3: (0.2)^2 both               = 0.04
    # 0.5 * (0.64 + 0.25 + 0.64 + 0.04) / 4 = 0.19625
    np.testing.assert_allclose(out.loss, 0.19625, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["ppo/value/clipfrac"], 0.5)
    np.testing.assert_allclose(out.metrics["ppo/value/mean"], (0.5 + 0.5 - 0.5 + 0.1) / 4)
    # Clipped tokens get no gradient; the others (v - R) / 4: 0.5 / 4 and -0.2 / 4.
    g = jax.grad(lambda v: clipped_value({"values": v}, batch).loss)(outputs["values"])
    np.testing.assert_allclose(g[0], [0.0, 0.125, 0.0, -0.05, 0.0], rtol=1e-5, atol=1e-7)


def test_unclipped_value_hand_values():
    outputs, batch = _value_case()
    # 0.5 * (0.25 + 0.25 + 0.25 + 0.04) / 4 = 0.09875
    np.testing.assert_allclose(unclipped_value(outputs, batch).loss, 0.09875, rtol=1e-5)


def test_clipped_value_against_loop():
    rng = np.random.default_rng(5)
    b, t = 3, 5
    lengths = [5, 2, 3]
    mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.float32)
    v, old, ret = (rng.normal(size=(b, t)).astype(np.float32) for _ in range(3))
    terms = []
    for i in range(b):
        for j in range(lengths[i]):
            vc = old[i, j] + min(max(v[i, j] - old[i, j], -0.3), 0.3)
            terms.append(max((v[i, j] - ret[i, j]) ** 2, (vc - ret[i, j]) ** 2))
    batch = {"old_values": old, "returns": ret, "response_mask": mask}
    out = clipped_value({"values": v}, batch, clip_range=0.3)
    np.testing.assert_allclose(out.loss, 0.5 * np.mean(terms), rtol=1e-5)


def _random_policy_batch(seed, b=4, t=6):
    rng = np.random.default_rng(seed)
    lengths = np.array([6, 2, 4, 1])[:b]
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    old = -rng.random((b, t)).astype(np.float32) * 3
    logp = old + rng.normal(size=(b, t)).astype(np.float32) * 0.3
    adv = rng.normal(size=(b, t)).astype(np.float32)
    return lengths, mask, old, logp, adv


def test_asymmetric_clip_against_loop():
    """DAPO's clip-higher: the ratio is clipped to [1 - 0.2, 1 + 0.28]."""
    lengths, mask, old, logp, adv = _random_policy_batch(3)
    terms = []
    for i, n in enumerate(lengths):
        for j in range(n):
            r = math.exp(float(logp[i, j]) - float(old[i, j]))
            a = float(adv[i, j])
            terms.append(max(-a * r, -a * min(max(r, 0.8), 1.28)))
    batch = {"old_logprobs": old, "advantages": adv, "response_mask": mask}
    out = ppo_clip({"logprobs": logp}, batch, clip_eps_high=0.28)
    np.testing.assert_allclose(out.loss, np.mean(terms), rtol=1e-5, atol=1e-6)
    lo_only = ppo_clip({"logprobs": logp}, batch, clip_eps=0.2, clip_eps_low=0.1)
    symmetric = ppo_clip({"logprobs": logp}, batch, clip_eps=0.2)
    assert float(lo_only.loss) != float(symmetric.loss)


@pytest.mark.parametrize("reduction", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_ppo_clip_reductions_against_loop(reduction):
    lengths, mask, old, logp, adv = _random_policy_batch(4)
    b, t = mask.shape
    rows = []
    for i, n in enumerate(lengths):
        row = []
        for j in range(n):
            r = math.exp(float(logp[i, j]) - float(old[i, j]))
            a = float(adv[i, j])
            row.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
        rows.append(row)
    if reduction == "seq_mean_token_mean":
        want = np.mean([np.mean(r) for r in rows])
    else:  # Dr. GRPO: every token summed, divided by a constant (rows x padded length)
        want = sum(sum(r) for r in rows) / (b * t)
    batch = {"old_logprobs": old, "advantages": adv, "response_mask": mask}
    out = ppo_clip({"logprobs": logp}, batch, reduction=reduction)
    np.testing.assert_allclose(out.loss, want, rtol=1e-5, atol=1e-6)


def test_gspo_is_the_sequence_level_objective_in_value_and_gradient():
    """GSPO-token with one advantage per sequence and the seq-mean reduction equals the
    paper's sequence-level loss: s_i = exp(mean_t log r_t), L = mean_i max(-A s, -A clip(s))."""
    lengths, mask, old, logp, _ = _random_policy_batch(5)
    logp = old + (logp - old) * 1e-3  # ratios near 1, where GSPO's tiny range matters
    seq_adv = np.array([1.0, -2.0, 0.5, -0.3], np.float32)
    adv = seq_adv[:, None] * mask
    batch = {"old_logprobs": old, "advantages": adv, "response_mask": mask}

    def sequence_level(lp):
        log_s = jnp.sum((lp - old) * mask, axis=1) / mask.sum(1)
        s = jnp.exp(log_s)
        per_seq = jnp.maximum(-seq_adv * s, -seq_adv * jnp.clip(s, 1 - 3e-4, 1 + 4e-4))
        return jnp.mean(per_seq)

    def gspo_loss(lp):
        return ppo_losses.gspo({"logprobs": lp}, batch).loss

    np.testing.assert_allclose(gspo_loss(logp), sequence_level(logp), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(gspo_loss)(jnp.asarray(logp)),
        jax.grad(sequence_level)(jnp.asarray(logp)),
        rtol=1e-5,
        atol=1e-7,
    )


def test_cispo_gradient_is_the_clipped_weight_times_the_score_function():
    """d/d logp_t of CISPO = -clip(r_t, 1 - eps_l, 1 + eps_h) A_t / n_tokens, for every
    token: no token loses its gradient to clipping, unlike PPO-clip."""
    lengths, mask, old, logp, adv = _random_policy_batch(6)
    logp = old + (logp - old) * 3  # push ratios outside the range
    batch = {"old_logprobs": old, "advantages": adv, "response_mask": mask}
    grad = jax.grad(lambda lp: ppo_losses.cispo({"logprobs": lp}, batch).loss)(jnp.asarray(logp))
    ratio = np.exp(logp - old)
    want = -np.clip(ratio, 0.0, 1.28) * adv * mask / mask.sum()
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[mask > 0] != 0)
    out = ppo_losses.cispo({"logprobs": logp}, batch)
    assert 0 < float(out.metrics["ppo/policy/clipfrac"]) < 1
