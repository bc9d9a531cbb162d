"""Lower every RL update / experience / sample / finish / generate program variant at tiny
shapes and write each one's StableHLO text to a folder: run it before and after a change
that should not change any program, then compare the folders (`diff -r`).

    PYTHONPATH=$PWD python tests/steps/lower_programs.py /tmp/before

79 programs; about 2 minutes of CPU. Not a test (nothing to compare against in one run)."""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, "tests")
sys.path.insert(0, "tests/steps")
import fork_rollout_parts  # noqa: F401  (registers the stateful estimator fork_moving_baseline)
import jax
import jax.numpy as jnp
import numpy as np
from tiny import tiny_model

from rlhf_jax.config import OptimConfig, PPOConfig
from rlhf_jax.losses import get_loss
from rlhf_jax.models import init_scalar_head
from rlhf_jax.models.lora import split_adapters, with_lora
from rlhf_jax.rollout.generate import generate
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    init_rl_state,
    make_experience_fn,
    make_finish_fn,
    make_optimizer,
    make_sample_fn,
    make_update_fn,
)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
OPT = OptimConfig(lr=1e-2, grad_clip=1.0, eps=1e-4)
config, params = tiny_model(n_layers=1)
rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
n = 0


def save(name, lowered):
    global n
    (out / f"{name}.txt").write_text(lowered.as_text())
    n += 1


VARIANTS = {
    "ppo": {},
    "ppo_ptx": {"ptx": True},
    "ppo_ga2": {"grad_accum": 2},
    "ppo_ptx_ga2": {"ptx": True, "grad_accum": 2},
    "ppo_adaptive_ema": {"adaptive_kl": True, "ema_decay": 0.9},
    "ppo_topk_topp": {"top_k": 5, "top_p": 0.8, "temperature": 0.7},
    "ppo_kl_loss": {"kl_penalty": "loss", "kl_estimator": "k3"},
    "ppo_kl_none": {"kl_penalty": "none"},
    "shared": {"critic": "shared_trunk"},
    "shared_ptx_ga2": {
        "critic": "shared_trunk",
        "ptx": True,
        "grad_accum": 2,
        "kl_penalty": "loss",
    },
    "lora": {"lora": True},
    "lora_ptx_ga2": {"lora": True, "ptx": True, "grad_accum": 2},
    "grpo_kl_loss": {"advantage": "grpo", "samples_per_prompt": 4, "kl_penalty": "loss"},
    "grpo_kl_reward": {"advantage": "grpo", "samples_per_prompt": 4, "kl_penalty": "reward"},
    "grpo_kl_none_ga2": {
        "advantage": "grpo",
        "samples_per_prompt": 4,
        "kl_penalty": "none",
        "grad_accum": 2,
    },
    "grpo_lora_kl_none": {
        "advantage": "grpo",
        "samples_per_prompt": 4,
        "kl_penalty": "none",
        "lora": True,
    },
    "rloo_topk": {"advantage": "rloo", "samples_per_prompt": 4, "top_k": 3},
    "dr_grpo_seqnorm": {
        "advantage": "dr_grpo",
        "samples_per_prompt": 2,
        "loss_reduction": "seq_mean_token_sum_norm",
        "kl_penalty": "loss",
    },
    "stateful": {"advantage": "fork_moving_baseline", "kl_penalty": "none"},
    "ppo_epochs2_mb4": {"epochs": 2, "minibatch_size": 4, "ptx": True},
}

for name, ch in VARIANTS.items():
    ch = dict(ch)
    use_ptx, lora, ga = ch.pop("ptx", False), ch.pop("lora", False), ch.pop("grad_accum", 1)
    g = ch.get("samples_per_prompt", 1)
    settings = dict(
        rollout_batch=8 // g,
        minibatch_size=8,
        epochs=1,
        max_new_tokens=5,
        ema_decay=0.0,
        policy_optim=dataclasses.replace(OPT, grad_accum=ga),
        value_optim=OPT,
    )
    ppo = PPOConfig(**(settings | ch))
    algo = RLAlgorithm.from_config(ppo)
    pcfg, pparams = config, params
    if algo.shared_critic:
        pparams = {**params, "value_head": init_scalar_head(config, jax.random.key(2))}
    frozen_ref = params if algo.uses_reference else None
    if lora:
        pcfg = with_lora(config, 2, 4.0, ("q", "v"))
        from rlhf_jax.models import init_params

        pparams = split_adapters(init_params(pcfg, jax.random.key(3)))[1]
        frozen_ref = params
    critic = rm if algo.needs_critic and not algo.shared_critic else None
    tx = make_optimizer(ppo.policy_optim, 4)
    state = init_rl_state(pparams, critic, tx, tx if critic else None, ppo)
    frozen = Frozen(frozen_ref, rm)
    rng = np.random.default_rng(0)
    p = 8 // g
    ids = jnp.asarray(rng.integers(3, 61, (p, 4)), jnp.int32)
    mask = jnp.ones((p, 4), jnp.float32)
    ccfg = config if critic is not None else None
    exp_fn = make_experience_fn(pcfg, ccfg, config, ppo, algo, (2,), 0)
    save(f"{name}__experience", jax.jit(exp_fn).lower(state, frozen, ids, mask, jax.random.key(0)))
    exp, _ = jax.jit(exp_fn)(state, frozen, ids, mask, jax.random.key(0))
    ptx = None
    ptx_parts = ()
    if use_ptx:
        n_mb = 8 // ppo.minibatch_size
        ptx = {
            "input_ids": jnp.asarray(rng.integers(3, 61, (ppo.epochs, n_mb, 2, 6)), jnp.int32),
            "attention_mask": jnp.ones((ppo.epochs, n_mb, 2, 6), jnp.float32),
        }
        ptx_parts = (get_loss("ptx"), 1.0)
    upd = make_update_fn(pcfg, ccfg, ppo, algo, *ptx_parts, ga)
    args = (state, exp, ptx, jax.random.key(1)) + ((frozen,) if lora else ())
    save(f"{name}__update", jax.jit(upd).lower(*args))
    sample = make_sample_fn(pcfg, ppo, (2,), 0)
    from rlhf_jax.steps import policy_with

    save(
        f"{name}__sample",
        jax.jit(sample).lower(
            policy_with(pcfg, state.policy.params, frozen), ids, mask, jax.random.key(0)
        ),
    )
    if name.startswith(("grpo", "rloo")):
        fin = make_finish_fn(pcfg, ccfg, None, ppo, algo, (2,))
        r = jax.jit(sample)(
            policy_with(pcfg, state.policy.params, frozen), ids, mask, jax.random.key(0)
        )
        save(
            f"{name}__finish_fn",
            jax.jit(fin).lower(state, Frozen(frozen_ref, None), r, jnp.arange(8.0)),
        )

ids = jnp.asarray(np.random.default_rng(1).integers(3, 61, (3, 4)), jnp.int32)
mask = jnp.ones((3, 4), jnp.float32).at[0, :2].set(0)
GEN = {
    "greedy": dict(temperature=0.0),
    "plain": dict(),
    "eos": dict(eos_id=2, temperature=0.8),
    "eos_multi_pad": dict(eos_id=(2, 5), pad_id=0),
    "topk": dict(top_k=4),
    "topp_support": dict(top_p=0.7, record_support=True),
    "topk_topp_support": dict(top_k=5, top_p=0.9, temperature=0.7, record_support=True, eos_id=2),
}
for name, kw in GEN.items():
    for tied in (False, True):
        cfg, prm = tiny_model(n_layers=2, tie_embeddings=tied)
        save(
            f"generate_{name}_tied{int(tied)}",
            jax.jit(lambda p, i, m, k, cfg=cfg, kw=kw: generate(cfg, p, i, m, k, 6, **kw)).lower(
                prm, ids, mask, jax.random.key(0)
            ),
        )
print("programs", n)
