"""The RL stage's programs on abstract inputs: the mirror of `loops.rl.rl_stage` (its `init`,
`_compile` and `_make_experience`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from rlhf_jax.config import Config
from rlhf_jax.loops.adapters import StageWeights, adapter_key, stage_weights
from rlhf_jax.loops.rl import RLModels, _critic_init, _place_frozen
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig, init_scalar_head
from rlhf_jax.plan import abstract as ab
from rlhf_jax.plan.programs import (
    Assembly,
    Forward,
    Program,
    StageBuild,
    Start,
    train_state_detail,
)
from rlhf_jax.sharding import (
    jit_experience,
    jit_finish,
    jit_sample,
    jit_update,
    logical_to_mesh_spec,
)
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    init_rl_state,
    make_experience_fn,
    make_finish_fn,
    make_optimizer,
    make_sample_fn,
    make_update_fn,
    policy_with,
)


def kv_cache_bytes(model_cfg: ModelConfig, rows: int, slots: int, runtime: Runtime) -> int:
    """`rollout.generate`'s cache on one device: per layer k and v [B, kv_heads, slots,
    head_dim] in the compute dtype, rows split like the prompts, kv heads like the k
    projection's weights."""
    shape = (rows, model_cfg.n_kv_heads, slots, model_cfg.head_dim)
    spec = logical_to_mesh_spec(
        ("batch", "kv_heads", None, None), runtime.rules, runtime.mesh, shape
    )
    sharding = NamedSharding(runtime.mesh, spec)
    leaf = jax.ShapeDtypeStruct(shape, model_cfg.compute_dtype, sharding=sharding)
    return 2 * model_cfg.n_layers * ab.nbytes(leaf)


def rl(
    cfg: Config, policy_cfg: ModelConfig, reward_cfg: ModelConfig | None, runtime: Runtime
) -> StageBuild:
    """`loops.rl.rl_stage` from the SFT policy (and the reward model unless a reward function
    scores)."""
    ppo = cfg.ppo
    algo = RLAlgorithm.from_config(ppo)
    updates = ppo.iterations * ppo.epochs * (ppo.episodes // ppo.minibatch_size)
    policy_tx = make_optimizer(ppo.policy_optim, updates)
    separate_critic = algo.needs_critic and not algo.shared_critic
    critic_tx = make_optimizer(ppo.value_optim, updates) if separate_critic else None
    starts = {"policy": Start(policy_cfg, False)}
    if algo.reward_fn is None:
        starts["reward"] = Start(reward_cfg, True)

    def create(p, c, cf):  # one function object: every `init_sharded_state` compiles once
        return init_rl_state(p, c, policy_tx, critic_tx, ppo, cf)

    def assemble(s: dict, key: jax.Array) -> Assembly:
        models = RLModels(policy_cfg, s["policy"], reward_cfg, s.get("reward"))
        policy = stage_weights(
            cfg.lora, "policy", policy_cfg, models.sft_params, adapter_key(key), runtime
        )
        critic = StageWeights(None, None, None)
        head_key = jax.random.fold_in(key, 2**31 - 1)
        if algo.shared_critic:  # the value head trains with the policy, on its trunk
            head_sh = runtime.param_shardings(policy_cfg, scalar=True)["head"]
            policy = dataclasses.replace(
                policy,
                trained={**policy.trained, "value_head": init_scalar_head(policy_cfg, head_key)},
                trained_shardings={**policy.trained_shardings, "value_head": head_sh},
            )
        elif algo.needs_critic:
            critic_cfg, critic_params = _critic_init(models, head_key)
            critic = stage_weights(
                cfg.lora, "critic", critic_cfg, critic_params, adapter_key(key, 1), runtime, True
            )
        lora_policy = policy.frozen is not None
        ref_sh = None
        if algo.uses_reference or lora_policy:
            # (not the trained shardings: they may hold a value head)
            ref_sh = policy.frozen_shardings
            if not lora_policy:
                ref_sh = runtime.param_shardings(policy.config)
        reward_sh = None
        if algo.reward_fn is None:
            reward_sh = runtime.param_shardings(reward_cfg, scalar=True)
        dtype = cfg.model.frozen_dtype
        frozen = Frozen(
            ref=None if ref_sh is None else _place_frozen(models.sft_params, ref_sh, dtype),
            reward=None
            if reward_sh is None
            else _place_frozen(models.reward_params, reward_sh, dtype),
        )
        # The starting weights stay alive through RL (`RLModels`): they are the frozen models
        # themselves unless `model.frozen_dtype` placed cast copies, and the SFT weights are
        # kept beside everything when there is no reference.
        cast = [k for k, v in s.items() if _has_float32(v)] if dtype is not None else []
        kept = {k: s[k] for k in cast} or None
        if kept is None and ref_sh is None:
            kept = {"policy": s["policy"]}
        return Assembly(
            create,
            (policy.trained, critic.trained, critic.frozen),
            (policy.trained_shardings, critic.trained_shardings, critic.frozen_shardings),
            frozen,
            Frozen(ref=ref_sh, reward=reward_sh),
            kept=kept,
            info={"policy": policy.config, "critic": critic.config, "lora": lora_policy},
        )

    def detail(state, a: Assembly) -> dict[str, int]:
        return {
            **train_state_detail(state.policy, "policy"),
            **train_state_detail(state.critic, "critic"),
            "ema/policy": ab.nbytes(state.ema_params),
            "optimizer/rl_scalars": ab.nbytes((state.beta, state.iteration)),
            "frozen/reference": ab.nbytes(a.frozen.ref),
            "frozen/reward": ab.nbytes(a.frozen.reward),
            "kept_weights/policy": ab.nbytes(a.kept),
        }

    def programs(a: Assembly, state, state_sh) -> list[Program]:
        return _programs(cfg, algo, a, state, state_sh, reward_cfg, runtime)

    seq, mb = ppo.max_prompt_len + ppo.max_new_tokens, ppo.minibatch_size
    # The policy's LM head runs on the response positions only; a shared critic reads the
    # same trunk forward.
    forwards = [Forward(policy_cfg, mb, seq, ppo.max_new_tokens)]
    if separate_critic:
        critic_cfg = reward_cfg if reward_cfg is not None else policy_cfg
        forwards.append(Forward(critic_cfg, mb, seq, 0))
    if cfg.ptx.coef > 0:  # one ptx batch goes with each minibatch
        length = cfg.ptx.max_len
        forwards.append(Forward(policy_cfg, cfg.ptx.batch_size, length, length))
    # The experience's forwards over the whole rollout batch (no backward), for the advice
    # on `ppo.experience_micro_batch`.
    experience = [Forward(policy_cfg, ppo.episodes, seq, 0)] if algo.needs_critic else []
    if algo.uses_reference:
        experience.append(Forward(policy_cfg, ppo.episodes, seq, ppo.max_new_tokens))
    if reward_cfg is not None and algo.reward_fn is None:
        experience.append(Forward(reward_cfg, ppo.episodes, seq, 0))
    facts = {
        "model": "policy",
        "accum_key": "ppo.policy_optim.grad_accum",
        "grad_accum": ppo.policy_optim.grad_accum,
        "batch_size": ppo.minibatch_size,
        "forwards": tuple(forwards),
        "critic": separate_critic,
        "experience": tuple(experience),
    }
    return StageBuild("ppo", starts, assemble, programs, detail, facts)


def _programs(cfg, algo, a: Assembly, state, state_sh, reward_cfg, runtime) -> list[Program]:
    """`loops.rl._compile` and `_make_experience`: experience (one call with the reward
    model, or sample + finish around a host reward function), then the update."""
    ppo, mesh, rules = cfg.ppo, runtime.mesh, runtime.rules
    act = runtime.activation_rules
    policy_cfg, critic_cfg = a.info["policy"], a.info["critic"]
    frozen, frozen_sh = a.frozen, a.frozen_shardings
    eos, pad = policy_cfg.eos_ids or (0,), policy_cfg.pad_token_id or 0
    key = ab.step_key(runtime)
    prompts = ab.prompt_batch(runtime, ppo.rollout_batch, ppo.max_prompt_len)
    slots = ppo.max_prompt_len + ppo.max_new_tokens - 1
    kv = kv_cache_bytes(policy_cfg, ppo.episodes, slots, runtime)
    if algo.reward_fn is None:
        fn = make_experience_fn(policy_cfg, critic_cfg, reward_cfg, ppo, algo, eos, pad)
        args = (state, frozen, *prompts, key)
        experience = ab.rows_like(runtime, jax.eval_shape(fn, *args)[0])
        jitted = jit_experience(fn, state_sh, frozen_sh, mesh, rules, act)
        roles = ("state", "frozen", "batch", "batch", "key")
        out = [Program("experience", jitted, args, roles, training=False, kv_cache=kv)]
    else:
        sample = make_sample_fn(policy_cfg, ppo, eos, pad)
        finish = make_finish_fn(policy_cfg, critic_cfg, None, ppo, algo, eos)
        weights = policy_with(policy_cfg, state.policy.params, frozen)
        weights_sh = policy_with(policy_cfg, state_sh.policy.params, frozen_sh)
        s_args = (weights, *prompts, key)
        rollout = ab.rows_like(runtime, jax.eval_shape(sample, *s_args))
        scores = ab.rows_like(runtime, jax.ShapeDtypeStruct((ppo.episodes,), jnp.float32))
        f_args = (state, frozen, rollout, scores)
        experience = ab.rows_like(runtime, jax.eval_shape(finish, *f_args)[0])
        out = [
            Program(
                "sample",
                jit_sample(sample, weights_sh, mesh, rules, act),
                s_args,
                ("policy_weights", "batch", "batch", "key"),
                training=False,
                kv_cache=kv,
            ),
            Program(
                "finish",
                jit_finish(finish, state_sh, frozen_sh, mesh, rules, act),
                f_args,
                ("state", "frozen", "rollout", "scores"),
                training=False,
            ),
        ]
    use_ptx = cfg.ptx.coef > 0  # the pipeline has ptx data; `rlhf-jax ppo` then needs ptx.data
    n_mb = ppo.episodes // ppo.minibatch_size
    ptx = None
    if use_ptx:
        ptx = ab.ptx_batch(runtime, ppo.epochs, n_mb, cfg.ptx.batch_size, cfg.ptx.max_len)
    update_fn = make_update_fn(
        policy_cfg,
        critic_cfg,
        ppo,
        algo,
        get_loss("ptx", cfg.ptx.loss) if use_ptx else None,
        cfg.ptx.coef,
        ppo.policy_optim.grad_accum,
    )
    args, roles = (state, experience, ptx, key), ("state", "experience", "batch", "key")
    if a.info["lora"]:  # the update reads the policy's base in `frozen`
        jitted = jit_update(
            update_fn, state_sh, mesh, rules, frozen_shardings=frozen_sh, activation_rules=act
        )
        args, roles = (*args, frozen), (*roles, "frozen")
    else:
        jitted = jit_update(update_fn, state_sh, mesh, rules, activation_rules=act)
    return [*out, Program("update", jitted, args, roles, training=True)]


def _has_float32(tree) -> bool:
    """Whether `model.frozen_dtype` casts `tree` into a new copy (`loops.rl._place_frozen`
    reuses the buffers of weights already stored in another dtype)."""
    return any(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
