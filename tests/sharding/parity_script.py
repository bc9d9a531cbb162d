"""Run by test_mesh_parity.py in subprocesses with 8 simulated CPU devices (the device count
must be fixed before JAX starts):

    python parity_script.py TESTS_DIR OUT.npz ref            # plain jit on one device
    python parity_script.py TESTS_DIR OUT.npz 8x1x1 1x8x1    # sharded on these meshes

Each run does one SFT step (2 accumulated micro-batches of 25 and 6 target tokens; the
one-device reference takes the batch whole, grad_accum=1: accumulation and data parallelism
together must give the whole batch's step), one RM step, one DPO step (pair weighting, 2
micro-batches of 12 and 6 pairs against a whole-batch reference), one PPO iteration
(experience + update, with ptx and EMA) and one GRPO iteration (2 samples per prompt, KL in the
loss, no critic, 2 micro-batches of unequal token counts) from the same weights, batches and
keys, saves the
metrics and some updated weights and Adam moments to OUT.npz as "MESH|KIND|NAME", and prints
one JSON object of facts about the placement (shardings, bytes per device, errors).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from result_line import emit  # noqa: E402
from tiny import tiny_config  # noqa: E402

from rlhf_jax.config import MeshConfig, OptimConfig, PPOConfig  # noqa: E402
from rlhf_jax.errors import RlhfJaxError  # noqa: E402
from rlhf_jax.losses import get_loss  # noqa: E402
from rlhf_jax.models import init_params, init_scalar_head, scalar_trunk  # noqa: E402
from rlhf_jax.sharding import (  # noqa: E402
    batch_sharding,
    init_sharded_state,
    jit_experience,
    jit_step,
    jit_update,
    make_global_batch,
    make_mesh,
    model_param_shardings,
    shard_tree,
)
from rlhf_jax.steps import (  # noqa: E402
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

EOS, PAD = (2,), 0

# Sizes every mesh axis divides (tensor 4: heads, kv_heads, mlp, vocab; fsdp 8: embed).
config = tiny_config(vocab_size=64, n_kv_heads=4, mlp_dim=64, n_layers=1)
init = jax.jit(init_params, static_argnums=0)  # one compile instead of op-by-op init
policy, trunk = init(config, jax.random.key(0)), init(config, jax.random.key(1))
reward = {"trunk": scalar_trunk(trunk), "head": init_scalar_head(config, jax.random.key(2))}
rng = np.random.default_rng(0)

sft_batch = {
    "input_ids": rng.integers(3, 64, (8, 8)).astype(np.int32),
    "attention_mask": np.ones((8, 8), np.float32),
    # Targets from these positions on: rows 0, 2, 4, 6 (micro-batch 0) hold 25 target
    # tokens, rows 1, 3, 5, 7 hold 6.
    "loss_mask": (np.arange(8)[None] >= np.array([[1], [7], [2], [6], [3], [7], [1], [6]])).astype(
        np.float32
    ),
}
rm_ids = rng.integers(3, 64, (8, 3, 6)).astype(np.int32)
rm_batch = {
    "input_ids": rm_ids,
    "attention_mask": np.ones((8, 3, 6), np.float32),
    # Prompts with 3 completions (3 pairs) and with 2 (1 pair): the DPO micro-batches
    # (rows 0, 2, 4, 6 and 1, 3, 5, 7) hold 12 and 6 pairs.
    "completion_mask": (np.arange(3)[None] < np.array([[3, 2, 3, 2, 3, 3, 3, 2]]).T).astype(
        np.float32
    ),
    "rank": np.tile(np.arange(3, dtype=np.int32), (8, 1)),
}
# DPO on the same rankings: completions start after 2 prompt tokens; reference log-probs made up
dpo_batch = {
    **rm_batch,
    "completion_start": np.full((8,), 2, np.int32),
    "ref_logps": (-rng.uniform(8, 16, (8, 3))).astype(np.float32),
}
prompt_mask = np.ones((8, 4), np.float32)
prompt_mask[:3, :2] = 0
prompt_ids = rng.integers(3, 64, (8, 4)).astype(np.int32) * (prompt_mask > 0)
ptx_batch = {
    "input_ids": rng.integers(3, 64, (1, 1, 8, 6)).astype(np.int32),
    "attention_mask": np.ones((1, 1, 8, 6), np.float32),
}

# Adam's first step is lr * g / (|g| + eps): for a weight whose gradient is ~eps, a 1e-10
# change in g (a different summation order across shards) moves it by ~lr/2. A larger eps
# keeps the comparison about sharding rather than about that conditioning.
optim = OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-4)
sft_tx = make_optimizer(optim, 10)
rm_tx = make_optimizer(optim, 10)
ppo = PPOConfig(
    rollout_batch=8,
    minibatch_size=8,
    epochs=1,
    max_new_tokens=4,
    ema_decay=0.9,
    policy_optim=OptimConfig(lr=1e-3, eps=1e-4),
    value_optim=OptimConfig(lr=1e-3, eps=1e-4),
)
policy_tx = make_optimizer(ppo.policy_optim, 4)
value_tx = make_optimizer(ppo.value_optim, 4)
sft_fn = make_sft_step(config, get_loss("sft"), grad_accum=2)
sft_whole_fn = make_sft_step(config, get_loss("sft"), grad_accum=1)
rm_fn = make_reward_step(config, get_loss("reward"))
dpo_loss = get_loss("preference", "dpo", beta=0.5, weighting="pair")
dpo_fn = make_preference_step(config, dpo_loss, grad_accum=2)
dpo_whole_fn = make_preference_step(config, dpo_loss, grad_accum=1)
algo = RLAlgorithm.from_config(ppo)
exp_fn = make_experience_fn(config, config, config, ppo, algo, EOS, PAD)
update_fn = make_update_fn(config, config, ppo, algo, get_loss("ptx"), 1.0)
grpo = PPOConfig(
    rollout_batch=8,
    samples_per_prompt=2,
    minibatch_size=16,
    epochs=1,
    max_new_tokens=4,
    ema_decay=0.0,
    advantage="grpo",
    kl_penalty="loss",
    beta=0.1,
    policy_optim=OptimConfig(lr=1e-3, eps=1e-4, grad_accum=2),
)
grpo_algo = RLAlgorithm.from_config(grpo)
grpo_exp_fn = make_experience_fn(config, None, config, grpo, grpo_algo, EOS, PAD)
grpo_update_fn = make_update_fn(config, None, grpo, grpo_algo, grad_accum=2)
KEY = jax.random.key(7)


def ppo_iteration(exp_call, update_call, state, frozen, prompts, mask, ptx):
    exp, exp_metrics = exp_call(state, frozen, prompts, mask, KEY)
    state, metrics = update_call(state, exp, ptx, jax.random.key(8))
    return state, {**exp_metrics, **metrics}


def summary(state, metrics, ppo_state=False):
    """Metrics and a few updated leaves (weights and Adam moments), as NumPy."""
    ts = state.policy if ppo_state else state
    params = ts.params.get("trunk", ts.params)
    adam = ts.opt_state.inner_state[1][0]  # skip_non_finite -> chain(clip, adamw) -> adam
    out = {f"metric:{k}": np.asarray(v) for k, v in metrics.items()}
    out["param:embed"] = np.asarray(params["embed"])
    out["param:q"] = np.asarray(params["layers"]["attn"]["q"]["kernel"])
    out["param:down"] = np.asarray(params["layers"]["mlp"]["down"]["kernel"])
    mu = adam.mu.get("trunk", adam.mu)
    out["adam:mu/embed"] = np.asarray(mu["embed"])
    nu = adam.nu.get("trunk", adam.nu)
    out["adam:nu/q"] = np.asarray(nu["layers"]["attn"]["q"]["kernel"])
    if ppo_state:
        if state.critic is not None:
            out["param:value_head"] = np.asarray(state.critic.params["head"]["kernel"])
        if state.ema_params is not None:
            out["ema:embed"] = np.asarray(state.ema_params["embed"])
        out["beta"] = np.asarray(state.beta)
    return out


def reference():
    sft = jax.jit(sft_whole_fn)(TrainState.create(policy, sft_tx), sft_batch, KEY)
    rm = jax.jit(rm_fn)(TrainState.create(reward, rm_tx), rm_batch, KEY)
    dpo = jax.jit(dpo_whole_fn)(TrainState.create(policy, sft_tx), dpo_batch, KEY)
    state = init_rl_state(policy, reward, policy_tx, value_tx, ppo)
    it = ppo_iteration(
        jax.jit(exp_fn),
        jax.jit(update_fn),
        state,
        Frozen(policy, reward),
        prompt_ids,
        prompt_mask,
        ptx_batch,
    )
    state = init_rl_state(policy, None, policy_tx, None, grpo)
    g_it = ppo_iteration(
        jax.jit(grpo_exp_fn),
        jax.jit(grpo_update_fn),
        state,
        Frozen(policy, reward),
        prompt_ids,
        prompt_mask,
        None,
    )
    return {
        "sft": summary(*sft),
        "rm": summary(*rm),
        "dpo": summary(*dpo),
        "ppo": summary(*it, ppo_state=True),
        "grpo": summary(*g_it, ppo_state=True),
    }


def sharded(shape):
    data, fsdp, tensor = shape
    mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    mesh, rules = make_mesh(mesh_cfg), mesh_cfg.rules
    pol_sh = model_param_shardings(config, mesh, rules)
    rm_sh = model_param_shardings(config, mesh, rules, scalar=True)
    rows = batch_sharding(mesh, rules, 1)
    out, info = {}, {}

    state, st_sh = init_sharded_state(
        lambda p: TrainState.create(p, sft_tx), (policy,), (pol_sh,), mesh
    )
    step = jit_step(sft_fn, st_sh, rows)
    batch = make_global_batch(sft_batch, mesh, rules, "sft.batch_size")
    new_state, metrics = step(state, batch, KEY)
    info["donated"] = bool(state.params["embed"].is_deleted())
    out["sft"] = summary(new_state, metrics)
    adam = new_state.opt_state.inner_state[1][0]
    emb, q = new_state.params["embed"], new_state.params["layers"]["attn"]["q"]["kernel"]
    info["embed_spec"] = list(emb.sharding.spec)
    info["embed_bytes_ratio"] = emb.addressable_shards[0].data.nbytes / emb.nbytes
    info["q_spec"] = list(q.sharding.spec)
    info["moments_like_params"] = (
        adam.mu["embed"].sharding == emb.sharding
        and adam.nu["layers"]["attn"]["q"]["kernel"].sharding == q.sharding
    )
    info["count_replicated"] = adam.count.sharding.spec == P()
    if shape == (1, 8, 1):
        try:
            make_global_batch({"x": np.zeros((6, 3))}, mesh, rules, "sft.batch_size")
        except RlhfJaxError as e:
            info["batch_error"] = str(e)

    state, st_sh = init_sharded_state(
        lambda p: TrainState.create(p, rm_tx), (reward,), (rm_sh,), mesh
    )
    step = jit_step(rm_fn, st_sh, rows)
    out["rm"] = summary(*step(state, make_global_batch(rm_batch, mesh, rules), KEY))

    state, st_sh = init_sharded_state(
        lambda p: TrainState.create(p, sft_tx), (policy,), (pol_sh,), mesh
    )
    step = jit_step(dpo_fn, st_sh, rows)
    out["dpo"] = summary(*step(state, make_global_batch(dpo_batch, mesh, rules), KEY))

    state, st_sh = init_sharded_state(
        lambda p, v: init_rl_state(p, v, policy_tx, value_tx, ppo),
        (policy, reward),
        (pol_sh, rm_sh),
        mesh,
    )
    fr_sh = Frozen(pol_sh, rm_sh)
    frozen = shard_tree(Frozen(policy, reward), fr_sh)
    it = ppo_iteration(
        jit_experience(exp_fn, st_sh, fr_sh, mesh, rules),
        jit_update(update_fn, st_sh, mesh, rules),
        state,
        frozen,
        *make_global_batch((prompt_ids, prompt_mask), mesh, rules, "ppo.rollout_batch"),
        make_global_batch(ptx_batch, mesh, rules, "ptx.batch_size", batch_axis=2),
    )
    out["ppo"] = summary(*it, ppo_state=True)
    info["frozen_alive"] = not frozen.ref["embed"].is_deleted()
    info["ema_like_policy"] = it[0].ema_params["embed"].sharding == pol_sh["embed"]

    state, st_sh = init_sharded_state(
        lambda p, v: init_rl_state(p, v, policy_tx, None, grpo),
        (policy, None),
        (pol_sh, None),
        mesh,
    )
    it = ppo_iteration(
        jit_experience(grpo_exp_fn, st_sh, fr_sh, mesh, rules),
        jit_update(grpo_update_fn, st_sh, mesh, rules),
        state,
        frozen,
        *make_global_batch((prompt_ids, prompt_mask), mesh, rules, "ppo.rollout_batch"),
        None,
    )
    out["grpo"] = summary(*it, ppo_state=True)
    info["grpo_no_critic"] = it[0].critic is None
    return out, info


def main():
    out_path, modes = sys.argv[2], sys.argv[3:]
    arrays, facts = {}, {"devices": jax.device_count()}
    for mode in modes:
        if mode == "ref":
            results, info = reference(), {}
        else:
            results, info = sharded(tuple(int(n) for n in mode.split("x")))
        facts[mode] = info
        for kind, values in results.items():
            for name, value in values.items():
                arrays[f"{mode}|{kind}|{name}"] = value
    np.savez(out_path, **arrays)
    emit(facts)


if __name__ == "__main__":
    main()
