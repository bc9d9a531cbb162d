"""`model.logits_chunk`: the steps with the LM head chunked (no [tokens, vocab] logits) equal
the same steps through the whole logits (the dense path, the reference) in their losses,
metrics, log-probs and weight updates; the automatic switch keeps small calls dense."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import tiny_model

from rlhf_jax.config import OptimConfig, PPOConfig
from rlhf_jax.losses import get_loss
from rlhf_jax.models import init_scalar_head
from rlhf_jax.models.token_stats import AUTO_CHUNK_BYTES, logits_chunk
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    TrainState,
    init_rl_state,
    make_experience_fn,
    make_optimizer,
    make_sft_step,
    make_update_fn,
)

# Adam's first step is lr * g / (|g| + eps): with eps large against rounding, a gradient's
# float error reaches the weights scaled by lr / eps at most (100x here), never a sign flip.
ADAM = OptimConfig(lr=1e-2, schedule="constant", grad_clip=0.0, eps=1e-4)


def _close(got, want, tol=2e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), got, want)


def test_the_automatic_switch_chunks_only_large_calls():
    config, _ = tiny_model()
    assert logits_chunk(config, 64, 24) == 0  # the quickstart's sizes: dense, as always
    big = config.replace(vocab_size=128_256)
    positions = logits_chunk(big, 32, 1024)  # 16 GiB of logits: chunked
    assert positions > 0 and 32 * positions * 128_256 * 4 <= AUTO_CHUNK_BYTES
    assert logits_chunk(big.replace(logits_chunk=0), 32, 1024) == 0  # forced off
    assert logits_chunk(config.replace(logits_chunk=40), 8, 5) == 5  # 40 tokens of 8 rows


def test_sft_step_chunked_equals_dense():
    config, params = tiny_model(n_layers=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 61, (4, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6], [9], [4]]), jnp.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.at[:, :3].set(0)}
    out = {}
    for chunk in (0, 8):  # 8 tokens of 4 rows: 2 positions per chunk, the last one padded
        cfg = config.replace(logits_chunk=chunk)
        step = jax.jit(make_sft_step(cfg, get_loss("sft")))
        state, metrics = step(TrainState.create(params, optax.sgd(1.0)), batch, None)
        out[chunk] = state.params, metrics
    assert float(out[8][1]["sft/accuracy"]) == float(out[0][1]["sft/accuracy"])
    _close(out[8], out[0])


def _rl(config, params, **changes):
    settings = dict(
        rollout_batch=4, samples_per_prompt=2, minibatch_size=8, epochs=1, max_new_tokens=5,
        temperature=0.7, ema_decay=0.0, policy_optim=ADAM, value_optim=ADAM,
    )  # fmt: skip
    ppo = PPOConfig(**(settings | changes))
    algo = RLAlgorithm.from_config(ppo)
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    critic = rm if algo.needs_critic and not algo.shared_critic else None
    policy = params
    if algo.shared_critic:
        policy = {**params, "value_head": init_scalar_head(config, jax.random.key(2))}
    tx = make_optimizer(ppo.policy_optim, 4)
    state = init_rl_state(policy, critic, tx, tx if critic else None, ppo)
    frozen = Frozen(params, rm)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 61, (4, 4)), jnp.int32)
    mask = jnp.ones((4, 4), jnp.float32)
    ptx = None
    if changes.get("kl_penalty") == "loss":  # with a pretraining batch through the head too
        ptx = {
            "input_ids": jnp.asarray(rng.integers(3, 61, (1, 1, 2, 6)), jnp.int32),
            "attention_mask": jnp.ones((1, 1, 2, 6), jnp.float32),
        }
    critic_cfg = config if critic is not None else None
    out = {}
    for chunk in (0, 16):  # 16 tokens of 8 rows: 2 positions per chunk
        cfg = config.replace(logits_chunk=chunk)
        exp_fn = jax.jit(make_experience_fn(cfg, critic_cfg, config, ppo, algo, (2,), 0))
        exp, exp_metrics = exp_fn(state, frozen, ids, mask, jax.random.key(0))
        ptx_parts = (get_loss("ptx"), 1.0) if ptx is not None else ()
        update = jax.jit(make_update_fn(cfg, critic_cfg, ppo, algo, *ptx_parts))
        new_state, metrics = update(state, exp, ptx, jax.random.key(1))
        out[chunk] = exp, exp_metrics, new_state.policy.params, metrics
    return out


@pytest.mark.parametrize(
    "changes",
    [
        {"top_k": 5, "top_p": 0.8},  # PPO with a critic, KL in the reward, a recorded support
        {"kl_penalty": "loss", "kl_estimator": "k3", "critic": "shared_trunk"},
        {"advantage": "grpo", "kl_penalty": "none"},
    ],
    ids=["ppo-top_k-top_p", "shared_trunk-kl_loss-ptx", "grpo"],
)  # fmt: skip
def test_rl_experience_and_update_chunked_equal_dense(changes):
    config, params = tiny_model(n_layers=1)
    out = _rl(config, params, **changes)
    dense, chunked = out[0], out[16]
    np.testing.assert_array_equal(chunked[0].response_ids, dense[0].response_ids)
    if dense[0].ref_logprobs is not None:
        _close(chunked[0].ref_logprobs, dense[0].ref_logprobs)
    _close(chunked[1], dense[1])
    _close(chunked[2], dense[2], tol=1e-4)  # the weights after one step: the gradients
    _close(chunked[3], dense[3])
    # the trainer's log-probs still recompute the sampler's (the ratio starts at 1)
    assert float(chunked[3]["rollout/logprob_mismatch_max"]) < 1e-5
