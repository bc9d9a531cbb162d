"""The RL stage's builder, for `loops.rl` (real weights) and the planner (abstract ones).

From the SFT policy (and the reward model unless a reward function scores): the policy's
(and a separate critic's) trained weights, under LoRA adapters on a frozen base; a shared
trunk's value head beside the policy; the frozen reference and reward model placed (cast
with `model.frozen_dtype`). Programs: experience (one call when the reward model scores;
sample and finish around host scoring when a reward function does), then the update.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from rlhf_jax.config import Config
from rlhf_jax.loops.adapters import StageWeights, adapter_key, stage_weights
from rlhf_jax.loops.build import Assembly, Forward, Program, StageBuild, Start, train_state_detail
from rlhf_jax.loops.packed_update import pack_layout
from rlhf_jax.loops.rollout_stages import merge_fn
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.shapes import nbytes, prompt_batch, ptx_batch, rows_like, step_key
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig, init_scalar_head, scalar_trunk
from rlhf_jax.sharding import (
    jit_experience,
    jit_finish,
    jit_sample,
    jit_update,
    logical_to_mesh_spec,
    shard_tree,
)
from rlhf_jax.sharding.rules import batch_sharding, replicated
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    init_rl_state,
    make_experience_fn,
    make_finish_fn,
    make_optimizer,
    make_sample_fn,
    make_update_fn,
    policy_weights,
    policy_with,
)
from rlhf_jax.steps.experience import make_score_fn, make_scored_finish_fn, missing_eos_rule
from rlhf_jax.steps.rl_inputs import uses_ptx as steps_uses_ptx
from rlhf_jax.steps.rl_pack import PackLayout


def uses_ptx(cfg: Config, has_ptx_data: bool) -> bool:
    """Whether the update mixes in the pretraining loss: `ptx.coef > 0` and ptx batches to
    feed it (the pipeline always has them; `rlhf-jax ppo` requires `ptx.data` then; a run
    without them, e.g. the pipeline's ptx ablation, passes False). The rule itself is the
    update's (`steps.rl_inputs.uses_ptx`), so the loop, the planner and the update agree."""
    return steps_uses_ptx(cfg.ptx.coef, has_ptx_data)


def critic_start(
    policy: tuple[ModelConfig, Any], reward: tuple[ModelConfig | None, Any], key: jax.Array
) -> tuple[ModelConfig, Any]:
    """The critic starts as the reward model (InstructGPT); without one, as the SFT trunk
    with a fresh head. policy, reward: (config, weights)."""
    if reward[1] is not None:
        return reward
    head = init_scalar_head(policy[0], key)
    return policy[0], {"trunk": scalar_trunk(policy[1]), "head": head}


def place_frozen(params, shardings, dtype: str | None):
    """Weights RL only reads, in their shards and (with `model.frozen_dtype`) cast there:
    a new copy, so the caller's full-precision weights (e.g. the SFT policy a LoRA policy
    folds into at the end) stay as they are."""
    if dtype is None or all(x.dtype != jnp.float32 for x in jax.tree.leaves(params)):
        return shard_tree(params, shardings)  # the same buffers when already placed
    cast = jax.jit(
        lambda p: jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, p),
        out_shardings=shardings,
    )
    return cast(shard_tree(params, shardings))


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
    return 2 * model_cfg.n_layers * nbytes(leaf)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLBuildSpec:
    """What the RL stage is built from: the run's config and its resolved algorithm, the
    starting models' configs (reward None when a reward function scores), the special ids
    sampling stops on / pads with, and whether the update mixes in ptx (`uses_ptx`)."""

    cfg: Config
    algo: RLAlgorithm
    policy_cfg: ModelConfig
    reward_cfg: ModelConfig | None
    special: tuple[tuple[int, ...], int]
    use_ptx: bool


def _with_value_head(policy: StageWeights, policy_cfg: ModelConfig, key, runtime) -> StageWeights:
    """A shared trunk: the value head trains with the policy, on its trunk."""
    head_sh = runtime.param_shardings(policy_cfg, scalar=True)["head"]
    return dataclasses.replace(
        policy,
        trained={**policy.trained, "value_head": init_scalar_head(policy_cfg, key)},
        trained_shardings={**policy.trained_shardings, "value_head": head_sh},
    )


def _trained(spec: RLBuildSpec, starts: dict, key: jax.Array, runtime: Runtime):
    """`(policy, critic)` StageWeights (the critic's all None without a separate one)."""
    cfg, algo = spec.cfg, spec.algo
    # Iteration i uses fold_in(key, i); the keys below are ones no iteration reaches.
    policy = stage_weights(
        cfg.lora, "policy", spec.policy_cfg, starts["policy"], adapter_key(key), runtime
    )
    critic = StageWeights(None, None, None)
    head_key = jax.random.fold_in(key, 2**31 - 1)
    if algo.shared_critic:
        policy = _with_value_head(policy, spec.policy_cfg, head_key, runtime)
    elif algo.needs_critic:
        critic_cfg, critic_params = critic_start(
            (spec.policy_cfg, starts["policy"]),
            (spec.reward_cfg, starts.get("reward")),
            head_key,
        )
        critic = stage_weights(
            cfg.lora, "critic", critic_cfg, critic_params, adapter_key(key, 1), runtime, True
        )
    return policy, critic


def _frozen(spec: RLBuildSpec, starts: dict, policy: StageWeights, runtime: Runtime):
    """`(Frozen weights placed, their shardings)`: the reference (the SFT weights; a LoRA
    policy's base) and the reward model."""
    algo, lora_policy = spec.algo, policy.frozen is not None
    ref_sh = None
    if algo.uses_reference or lora_policy:  # (not trained_shardings: may hold a value head)
        ref_sh = policy.frozen_shardings if lora_policy else runtime.param_shardings(policy.config)
    reward_sh = None
    if algo.reward_fn is None:
        reward_sh = runtime.param_shardings(spec.reward_cfg, scalar=True)
    dtype = spec.cfg.model.frozen_dtype
    frozen = Frozen(
        ref=None if ref_sh is None else place_frozen(starts["policy"], ref_sh, dtype),
        reward=None if reward_sh is None else place_frozen(starts["reward"], reward_sh, dtype),
    )
    return frozen, Frozen(ref=ref_sh, reward=reward_sh)


def _has_float32(tree) -> bool:
    """Whether `model.frozen_dtype` casts `tree` into a new copy (`place_frozen` reuses the
    buffers of weights already stored in another dtype)."""
    return any(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))


def _kept(spec: RLBuildSpec, starts: dict, frozen_sh: Frozen):
    """The starting weights alive beside the state (RL keeps them, `RLModels`): none when
    they are the frozen models themselves, the cast ones' originals under
    `model.frozen_dtype`, the SFT weights when there is no reference."""
    dtype = spec.cfg.model.frozen_dtype
    cast = [k for k, v in starts.items() if _has_float32(v)] if dtype is not None else []
    kept = {k: starts[k] for k in cast} or None
    if kept is None and frozen_sh.ref is None:
        kept = {"policy": starts["policy"]}
    return kept


def rl_build(spec: RLBuildSpec, runtime: Runtime) -> StageBuild:
    """The RL stage of `spec`: starts from `{"policy": SFT weights, "reward": RM weights}`
    (no "reward" when a reward function scores)."""
    algo, ppo = spec.algo, spec.cfg.ppo
    updates = ppo.iterations * ppo.epochs * (ppo.episodes // ppo.minibatch_size)
    policy_tx = make_optimizer(ppo.policy_optim, updates)
    separate_critic = algo.needs_critic and not algo.shared_critic
    critic_tx = make_optimizer(ppo.value_optim, updates) if separate_critic else None
    starts = {"policy": Start(spec.policy_cfg, False)}
    if algo.reward_fn is None:
        starts["reward"] = Start(spec.reward_cfg, True)

    def create(p, c, cf):  # one function object: every `init_sharded_state` compiles once
        return init_rl_state(p, c, policy_tx, critic_tx, ppo, cf)

    def assemble(s: dict, key: jax.Array) -> Assembly:
        policy, critic = _trained(spec, s, key, runtime)
        frozen, frozen_sh = _frozen(spec, s, policy, runtime)
        return Assembly(
            create,
            (policy.trained, critic.trained, critic.frozen),
            (policy.trained_shardings, critic.trained_shardings, critic.frozen_shardings),
            frozen,
            frozen_sh,
            kept=_kept(spec, s, frozen_sh),
            info={
                "policy": policy.config,
                "critic": critic.config,
                "lora": policy.frozen is not None,
                "weights": {"policy": policy, "critic": critic},
            },
        )

    def describe(state, a: Assembly) -> dict[str, int]:
        return {
            **train_state_detail(state.policy, "policy"),
            **train_state_detail(state.critic, "critic"),
            "ema/policy": nbytes(state.ema_params),
            "optimizer/rl_scalars": nbytes((state.beta, state.iteration)),
            "frozen/reference": nbytes(a.frozen.ref),
            "frozen/reward": nbytes(a.frozen.reward),
            "kept_weights/policy": nbytes(a.kept),
        }

    return StageBuild(
        "ppo",
        starts,
        assemble,
        functools.partial(rl_programs, spec, runtime),
        functools.partial(rl_inputs, spec, runtime),
        describe,
        functools.partial(rl_facts, spec),
    )


def rl_programs(spec: RLBuildSpec, runtime: Runtime, a: Assembly, state_sh) -> list[Program]:
    """The jitted programs of an iteration, in call order: experience (or sample, finish
    around the host's reward function), then the update."""
    cfg, algo, ppo = spec.cfg, spec.algo, spec.cfg.ppo
    mesh, rules, act = runtime.mesh, runtime.rules, runtime.activation_rules
    policy_cfg, critic_cfg = a.info["policy"], a.info["critic"]
    frozen_sh, (eos, pad) = a.frozen_shardings, spec.special
    slots = ppo.max_prompt_len + ppo.max_new_tokens - 1
    kv = kv_cache_bytes(policy_cfg, ppo.episodes, slots, runtime)
    if algo.filters:  # sample -> score -> filters (-> more rounds) -> finish, on the host
        out = _filtered_programs(spec, runtime, a, state_sh, kv)
    elif algo.reward_fn is None:
        fn = make_experience_fn(policy_cfg, critic_cfg, spec.reward_cfg, ppo, algo, eos, pad)
        jitted = jit_experience(fn, state_sh, frozen_sh, mesh, rules, activation_rules=act)
        roles = ("state", "frozen", "batch", "batch", "key")
        phases = _sample_and_finish(spec, runtime, a, state_sh, kv, spec.reward_cfg)
        out = [Program("experience", jitted, roles, False, kv, phases=phases)]
    else:
        out = list(_sample_and_finish(spec, runtime, a, state_sh, kv, None))
    ptx_loss = get_loss("ptx", cfg.ptx.loss) if spec.use_ptx else None
    # The update reads a LoRA policy's base in `frozen`.
    frozen_arg = {"frozen_shardings": frozen_sh} if a.info["lora"] else {}

    def jitted_for_layout(pack: PackLayout | None):
        update_fn = make_update_fn(
            policy_cfg, critic_cfg, ppo, algo, ptx_loss, cfg.ptx.coef,
            ppo.policy_optim.grad_accum, pack,
        )  # fmt: skip
        return jit_update(update_fn, state_sh, mesh, rules, activation_rules=act, **frozen_arg)

    roles = ("state", "experience", "batch", "key", *(("frozen",) if frozen_arg else ()))
    if not ppo.pack_update:
        return [*out, Program("update", jitted_for_layout(None), roles, training=True)]
    # Packed: the plan compiles the largest layout (every row its own packed row).
    largest = jitted_for_layout(pack_layout(ppo, mesh, rules))
    update = Program("update", largest, roles, training=True, jitted_for_layout=jitted_for_layout)
    return [*out, update]


def _sample_and_finish(
    spec: RLBuildSpec, runtime: Runtime, a: Assembly, state_sh, kv: int, reward_cfg
) -> tuple[Program, Program]:
    """Sampling and the rest of the experience as two programs: the iteration's own when a
    reward function scores on the host between them (`reward_cfg` None: `finish` takes the
    host's scores), else the fused experience program's phases (`finish` scores with the
    reward model and ignores its `scores` argument)."""
    ppo, algo, (eos, pad) = spec.cfg.ppo, spec.algo, spec.special
    mesh, rules, act = runtime.mesh, runtime.rules, runtime.activation_rules
    policy_cfg, critic_cfg = a.info["policy"], a.info["critic"]
    sample = jit_sample(
        make_sample_fn(policy_cfg, ppo, eos, pad),
        policy_with(policy_cfg, state_sh.policy.params, a.frozen_shardings),
        mesh,
        rules,
        activation_rules=act,
    )
    finish_fn = make_finish_fn(policy_cfg, critic_cfg, reward_cfg, ppo, algo, eos)
    if reward_cfg is not None:
        with_rm = finish_fn

        def finish_fn(state, frozen, rollout, _scores):
            return with_rm(state, frozen, rollout)

    finish = jit_finish(finish_fn, state_sh, a.frozen_shardings, mesh, rules, activation_rules=act)
    return (
        Program("sample", sample, ("policy_weights", "batch", "batch", "key"), False, kv),
        Program("finish", finish, ("state", "frozen", "rollout", "scores"), False),
    )


def _filtered_programs(spec: RLBuildSpec, runtime: Runtime, a: Assembly, state_sh, kv: int):
    """The rounds of a run with rollout filters (`loops/rollout_stages.py`): sample (and
    score, with the reward model), the missing-EOS rule after host scoring, the merge of a
    round's kept groups into the batch, and the finish of the merged batch."""
    algo, ppo, (eos, pad) = spec.algo, spec.cfg.ppo, spec.special
    mesh, rules, policy_cfg = runtime.mesh, runtime.rules, a.info["policy"]
    state_roles, frozen_sh = ("state", "frozen"), a.frozen_shardings
    rows, rep = batch_sharding(mesh, rules, 1), replicated(mesh)
    sample_fn = make_sample_fn(policy_cfg, ppo, eos, pad)
    if algo.reward_fn is None:
        score_fn = make_score_fn(spec.reward_cfg, ppo, eos)

        def sample_score(state, frozen, ids, mask, key):
            r = sample_fn(policy_weights(policy_cfg, state, frozen), ids, mask, key)
            return r, score_fn(frozen, r)

        shardings_in = (state_sh, frozen_sh, rows, rows, rep)
        sample = jax.jit(sample_score, in_shardings=shardings_in, out_shardings=rows)
        roles = (*state_roles, "batch", "batch", "key")
        out = [Program("sample", sample, roles, False, kv)]
    else:
        policy_sh = policy_weights(policy_cfg, state_sh, frozen_sh)
        sample = jit_sample(sample_fn, policy_sh, mesh, rules)
        eos_rule = jax.jit(
            lambda r, s: missing_eos_rule(s, r, eos, ppo),
            in_shardings=(rows, rows),
            out_shardings=rows,
        )
        out = [
            Program("sample", sample, ("policy_weights", "batch", "batch", "key"), False, kv),
            Program("eos_rule", eos_rule, ("rollout", "scores"), False),
        ]
    g = ppo.samples_per_prompt
    merge = jax.jit(merge_fn(g), in_shardings=(rows,) * 4, out_shardings=rows)
    scored_finish = make_scored_finish_fn(policy_cfg, a.info["critic"], ppo, algo)
    finish = jit_finish(scored_finish, state_sh, frozen_sh, mesh, rules)
    return [
        *out,
        Program("merge", merge, ("rollout", "rollout", "batch", "batch"), False),
        Program("finish", finish, (*state_roles, "rollout", "rollout"), False),
    ]


def _filtered_inputs(runtime: Runtime, a: Assembly, state, by_name: dict, prompts, key):
    """The round programs' abstract arguments; returns the finish program."""
    sample = by_name["sample"]
    if "eos_rule" in by_name:
        weights = policy_weights(a.info["policy"], state, a.frozen)
        sample.args = (weights, *prompts, key)
        rollout = rows_like(runtime, jax.eval_shape(sample.jitted, *sample.args))
        n = rollout.response_ids.shape[0]
        scores = rows_like(runtime, jax.ShapeDtypeStruct((n,), jnp.float32))
        by_name["eos_rule"].args = (rollout, scores)
        scored = jax.eval_shape(by_name["eos_rule"].jitted, rollout, scores)
        new = (rollout, rows_like(runtime, scored))
    else:
        sample.args = (state, a.frozen, *prompts, key)
        new = rows_like(runtime, jax.eval_shape(sample.jitted, *sample.args))
    n = new[0].response_ids.shape[0]
    index = rows_like(
        runtime, (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_))
    )
    by_name["merge"].args = (new, new, *index)
    finish = by_name["finish"]
    finish.args = (state, a.frozen, *new)
    return finish


def rl_inputs(spec: RLBuildSpec, runtime: Runtime, a: Assembly, state, progs: list[Program]):
    """Each program's abstract arguments: the prompt batch, the rollout and scores (host
    scoring), the experience the update trains on, the ptx batches."""
    ppo, cfg = spec.cfg.ppo, spec.cfg
    by_name = {p.name: p for p in progs}
    key = step_key(runtime)
    prompts = prompt_batch(runtime, ppo.rollout_batch, ppo.max_prompt_len)
    if "merge" in by_name:
        p = _filtered_inputs(runtime, a, state, by_name, prompts, key)
    elif "experience" in by_name:
        p = by_name["experience"]
        p.args = (state, a.frozen, *prompts, key)
        _sample_and_finish_inputs(runtime, a, state, p.phases, prompts, key)
    else:
        p = by_name["finish"]
        _sample_and_finish_inputs(runtime, a, state, (by_name["sample"], p), prompts, key)
    experience = rows_like(runtime, jax.eval_shape(p.jitted, *p.args)[0])
    ptx = None
    if spec.use_ptx:
        n_mb = ppo.episodes // ppo.minibatch_size
        ptx = ptx_batch(runtime, ppo.epochs, n_mb, cfg.ptx.batch_size, cfg.ptx.max_len)
    update = by_name["update"]
    frozen = (a.frozen,) if "frozen" in update.roles else ()
    update.args = (state, experience, ptx, key, *frozen)


def _sample_and_finish_inputs(
    runtime: Runtime, a: Assembly, state, programs: tuple[Program, Program], prompts, key
) -> None:
    """The abstract arguments of `_sample_and_finish`'s programs."""
    sample, finish = programs
    weights = policy_with(a.info["policy"], state.policy.params, a.frozen)
    sample.args = (weights, *prompts, key)
    rollout = rows_like(runtime, jax.eval_shape(sample.jitted, *sample.args))
    scores = rows_like(runtime, jax.ShapeDtypeStruct((rollout.response_ids.shape[0],), jnp.float32))
    finish.args = (state, a.frozen, rollout, scores)


def rl_facts(spec: RLBuildSpec) -> dict[str, Any]:
    """The trained forwards of an update and the experience's forwards (for the advice)."""
    cfg, algo, ppo = spec.cfg, spec.algo, spec.cfg.ppo
    policy_cfg, reward_cfg = spec.policy_cfg, spec.reward_cfg
    separate_critic = algo.needs_critic and not algo.shared_critic
    seq, mb = ppo.max_prompt_len + ppo.max_new_tokens, ppo.minibatch_size
    # The policy's LM head runs on the response positions only; a shared critic reads the
    # same trunk forward.
    forwards = [Forward(policy_cfg, mb, seq, ppo.max_new_tokens)]
    if separate_critic:
        critic_cfg = reward_cfg if reward_cfg is not None else policy_cfg
        forwards.append(Forward(critic_cfg, mb, seq, 0))
    if spec.use_ptx:  # one ptx batch goes with each minibatch
        length = cfg.ptx.max_len
        forwards.append(Forward(policy_cfg, cfg.ptx.batch_size, length, length))
    # The experience's forwards over the whole rollout batch (no backward), for the advice
    # on `ppo.experience_micro_batch`.
    experience = [Forward(policy_cfg, ppo.episodes, seq, 0)] if algo.needs_critic else []
    if algo.uses_reference:
        experience.append(Forward(policy_cfg, ppo.episodes, seq, ppo.max_new_tokens))
    if reward_cfg is not None and algo.reward_fn is None:
        experience.append(Forward(reward_cfg, ppo.episodes, seq, 0))
    return {
        "model": "policy",
        "accum_key": "ppo.policy_optim.grad_accum",
        "grad_accum": ppo.policy_optim.grad_accum,
        "batch_size": ppo.minibatch_size,
        "forwards": tuple(forwards),
        "critic": separate_critic,
        "experience": tuple(experience),
        # The sampler's prefill (once per prompt) and its decode path, for the advice on
        # `ppo.decode_layer_scan` and the floor of the micro-batch advice.
        "sampler": Forward(
            policy_cfg, ppo.episodes // ppo.samples_per_prompt, ppo.max_prompt_len, 0
        ),
        "decode_layer_scan": ppo.decode_layer_scan,
    }
