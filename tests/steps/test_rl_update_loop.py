"""The RL update's module-level functions (epochs x minibatches as nested scans, named
inputs, `UpdateConfig`) equal a plain Python loop over the same shuffles: each minibatch's
loss written out from the parts (policy loss + vf_coef * value loss + ptx_coef * ptx loss,
every part computing its own counts on the whole minibatch), one SGD step per minibatch, the
EMA after each step, and the metrics averaged over all minibatches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_rl import _synthetic_experience, setup

from rlhf_jax.losses import get_loss
from rlhf_jax.steps import TrainState, make_update_fn, response_values
from rlhf_jax.steps.experience import response_logprobs
from rlhf_jax.steps.rl_inputs import UpdateConfig, uses_ptx
from rlhf_jax.steps.sft import lm_outputs

LR, EMA, PTX_COEF = 0.1, 0.5, 0.5


def _naive(config, ppo, algo, policy, critic, exp, ptx, key):
    ptx_loss = get_loss("ptx")
    fields = {k: np.asarray(v) for k, v in exp._asdict().items() if v is not None}

    def loss(params, mb, ptx_mb):
        pol_params, crit_params = params
        logp, entropy, _ = response_logprobs(
            config, pol_params, mb["sequence_ids"], mb["sequence_mask"], mb["response_ids"],
            ppo.temperature, None,
        )  # fmt: skip
        batch = {
            "old_logprobs": mb["logprobs"], "advantages": mb["advantages"],
            "response_mask": mb["response_mask"], "group_ids": mb["group_ids"],
            "scores": mb["scores"], "rewards": mb["rewards"], "beta": jnp.float32(ppo.beta),
            "iteration": jnp.int32(0), "old_values": mb["values"], "returns": mb["returns"],
        }  # fmt: skip
        pol = algo.policy_loss({"logprobs": logp, "entropy": entropy}, batch)
        p = mb["sequence_ids"].shape[1] - mb["response_ids"].shape[1]
        values = response_values(config, crit_params, mb["sequence_ids"], mb["sequence_mask"], p)
        val = algo.value_loss({"values": values}, batch)
        outputs = lm_outputs(config, pol_params, ptx_mb["input_ids"], ptx_mb["attention_mask"])
        pt = ptx_loss(outputs, ptx_mb)
        total = pol.loss + ppo.vf_coef * val.loss + PTX_COEF * pt.loss
        gap = jnp.abs(logp - mb["logprobs"]) * (mb["response_mask"] != 0)
        return total, (pol.metrics["ppo/policy/loss"], jnp.max(gap))

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one compile, four calls
    params, ema = (policy, critic), policy
    totals, policy_losses, first_gap = [], [], None
    keys = jax.random.split(key, ppo.epochs)
    for e in range(ppo.epochs):
        order = np.asarray(jax.random.permutation(keys[e], 8)).reshape(-1, ppo.minibatch_size)
        for m, rows in enumerate(order):
            mb = {k: v[rows] for k, v in fields.items()}
            ptx_mb = {k: v[e, m] for k, v in ptx.items()}
            (total, (pol_loss, gap)), grads = grad_fn(params, mb, ptx_mb)
            params = jax.tree.map(lambda w, g: w - LR * g, params, grads)
            ema = jax.tree.map(lambda a, w: EMA * a + (1 - EMA) * w, ema, params[0])
            totals.append(float(total))
            policy_losses.append(float(pol_loss))
            first_gap = float(gap) if first_gap is None else first_gap
    return params, ema, np.mean(totals), np.mean(policy_losses), first_gap


def test_the_update_equals_a_python_loop_over_its_minibatches():
    config, ppo, algo, state, _, _, _ = setup(epochs=2, minibatch_size=4, ema_decay=EMA)
    sgd = optax.sgd(LR)
    state = state.replace(
        policy=TrainState.create(state.policy.params, sgd),
        critic=TrainState.create(state.critic.params, sgd),
    )
    exp = _synthetic_experience(algo)
    rng = np.random.default_rng(4)
    real = (np.arange(6)[None] < rng.integers(2, 7, (2, 2, 2, 1))).astype(np.float32)
    ptx = {
        "input_ids": (rng.integers(3, 61, (2, 2, 2, 6)) * real).astype(np.int32),
        "attention_mask": real,
    }
    key = jax.random.key(5)
    update = jax.jit(make_update_fn(config, config, ppo, algo, get_loss("ptx"), PTX_COEF))
    new, metrics = update(state, exp, ptx, key)
    (policy, critic), ema, total, policy_loss, first_gap = _naive(
        config, ppo, algo, state.policy.params, state.critic.params, exp, ptx, key
    )

    def close(got, want):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, want)

    close(new.policy.params, policy)
    close(new.critic.params, critic)
    close(new.ema_params, ema)
    np.testing.assert_allclose(metrics["ppo/loss/total"], total, rtol=1e-5)
    np.testing.assert_allclose(metrics["ppo/policy/loss"], policy_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["rollout/logprob_mismatch_max"], first_gap, rtol=1e-5)
    assert int(new.iteration) == 1 and int(new.policy.step) == 4


def test_ptx_is_on_only_with_a_loss_and_a_positive_coefficient():
    config, ppo, algo, *_ = setup()
    assert uses_ptx(0.5) and not uses_ptx(0.0) and not uses_ptx(0.5, has_ptx=False)
    cfg = UpdateConfig(config, config, ppo, algo, get_loss("ptx"), 0.5)
    assert cfg.use_ptx and not UpdateConfig(config, config, ppo, algo, None, 0.5).use_ptx
