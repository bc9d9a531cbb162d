"""The supervised stages (pretraining, SFT, the reward model, DPO) as one `SupervisedSpec`
each, and the one builder that turns a spec into its `StageBuild` for the loop
(`loops.train.run_supervised`) and the planner alike.

A stage trains a `TrainState` of the trained weights (fresh buffers: the caller's starting
weights survive, e.g. SFT weights that also start the reward model); under LoRA the base is
the starting weights themselves, placed, never copied, and passed to the step as its own
never-donated argument. One jitted step, the old state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from rlhf_jax.config import Config, LoraConfig
from rlhf_jax.loops.adapters import StageWeights, adapter_key, stage_weights
from rlhf_jax.loops.build import Assembly, Forward, Program, StageBuild, Start, train_state_detail
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.shapes import (
    lm_batch,
    nbytes,
    packed_ranking_batch,
    ranking_batch,
    ranking_k,
    step_key,
)
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig
from rlhf_jax.sharding import batch_sharding, jit_step
from rlhf_jax.steps import (
    TrainState,
    make_optimizer,
    make_preference_step,
    make_reward_step,
    make_sft_step,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupervisedSpec:
    """A supervised stage: `section` (steps, batch_size, optim) trains `model_cfg`'s weights
    with `make_step(config it runs) -> step(state, batch, key) -> (state, metrics)`.

    model: which model it trains ("policy", "reward"; None: pretraining, never LoRA);
    lora: the run's LoRA settings; scalar: a reward model's `{"trunk", "head"}`;
    batch: `runtime -> abstract batch` (the shapes the data encoder builds, for the plan);
    data_seed: the batches' shuffle seed; batch_key: the batch size's config key in errors;
    shardings: the weights' shardings when they are no model's (default: `model_cfg`'s)."""

    name: str
    section: Any
    model_cfg: ModelConfig | None
    make_step: Callable[[ModelConfig | None], Callable]
    batch: Callable[[Runtime], dict]
    data_seed: int
    log_every: int
    model: str | None = "policy"
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    scalar: bool = False
    batch_key: str = ""
    shardings: Any = None

    @property
    def who(self) -> str:
        return self.model or "policy"

    @property
    def size_key(self) -> str:
        return self.batch_key or f"{self.name}.batch_size"


def frozen_apart(step_fn: Callable) -> Callable:
    """`step(state, batch, key)` as `step(state, frozen, batch, key)` over a state without
    its frozen weights: what `jit_step(..., frozen_shardings=...)` compiles."""

    def step(state, frozen, batch, key):
        new, metrics = step_fn(state.replace(frozen=frozen), batch, key)
        return new.replace(frozen=None), metrics

    return step


def _weights(spec: SupervisedSpec, params: Any, key: jax.Array, runtime: Runtime):
    if spec.shardings is not None:
        return StageWeights(spec.model_cfg, params, spec.shardings)
    return stage_weights(
        spec.lora, spec.who, spec.model_cfg, params, adapter_key(key), runtime, spec.scalar
    )


def supervised_build(spec: SupervisedSpec, runtime: Runtime) -> StageBuild:
    """The stage of `spec`: starts from `{"model": weights}`."""
    tx = make_optimizer(spec.section.optim, spec.section.steps)
    who = spec.who

    def create(p):  # one function object: every `init_sharded_state` of it compiles once
        return TrainState.create(p, tx)

    def assemble(starts: dict, key: jax.Array) -> Assembly:
        w = _weights(spec, starts["model"], key, runtime)
        return Assembly(
            create,
            (w.trained,),
            (w.trained_shardings,),
            frozen=w.frozen,
            frozen_shardings=w.frozen_shardings,
            # Under LoRA the starting weights are the frozen base itself (a scalar model's
            # head, copied into the trained part, is left out as negligible).
            kept=None if w.frozen is not None else {"model": starts["model"]},
            info={"config": w.config, "lora": w.frozen is not None, "weights": w},
        )

    def programs(a: Assembly, state_sh) -> list[Program]:
        rows = batch_sharding(runtime.mesh, runtime.rules, 1)
        step = spec.make_step(a.info["config"])
        act = runtime.activation_rules
        if a.frozen_shardings is None:
            jitted = jit_step(step, state_sh, rows, activation_rules=act)
            return [Program("step", jitted, ("state", "batch", "key"), True)]
        jitted = jit_step(
            frozen_apart(step),
            state_sh,
            rows,
            frozen_shardings=a.frozen_shardings,
            activation_rules=act,
        )
        return [Program("step", jitted, ("state", "frozen", "batch", "key"), True)]

    batch = functools.cache(lambda: spec.batch(runtime))

    def inputs(a: Assembly, state, progs: list[Program]) -> None:
        (p,) = progs
        head = (state, a.frozen) if a.frozen is not None else (state,)
        p.args = (*head, batch(), step_key(runtime))

    def describe(state, a: Assembly) -> dict[str, int]:
        return {
            **train_state_detail(state, who),
            f"frozen/{who}_base": nbytes(a.frozen),
            f"kept_weights/{who}": nbytes(a.kept),
        }

    def make_facts() -> dict[str, Any]:
        ids = batch()["input_ids"]
        rows = ids.shape[0] * (ids.shape[1] if ids.ndim == 3 else 1)  # rankings: K rows each
        cfg = spec.model_cfg
        forward = Forward(cfg, rows, ids.shape[-1], 0 if spec.scalar else ids.shape[-1])
        return {
            "model": spec.model,
            "accum_key": f"{spec.name}.optim.grad_accum",
            "grad_accum": spec.section.optim.grad_accum,
            "batch_size": spec.section.batch_size,
            "forwards": (forward,),
        }

    starts = {"model": Start(spec.model_cfg, spec.scalar)}
    return StageBuild(spec.name, starts, assemble, programs, inputs, describe, make_facts)


def _lm_step(model_cfg: ModelConfig, loss, grad_accum: int):
    return make_sft_step(model_cfg, loss, grad_accum)


# Each stage's batches are shuffled by `cfg.seed` plus its offset.
DATA_SEED_OFFSETS = {"pretrain": 0, "sft": 0, "rm": 1, "dpo": 3}


def stage_batches(cfg: Config, stage: str) -> tuple[int, int, int, str]:
    """`stage`'s batches ("sft", "rm" or "dpo"): (global batch size, batches the stage takes,
    their seed, the batch size's config key), what `encode_own_rows` needs."""
    section = getattr(cfg, stage)
    seed = cfg.seed + DATA_SEED_OFFSETS[stage]
    return section.batch_size, section.steps, seed, f"{stage}.batch_size"


def pretrain_spec(cfg: Config, model_cfg: ModelConfig) -> SupervisedSpec:
    """Next-token training of the built-in task's random base model on its text."""
    p = cfg.pretrain
    loss = get_loss("sft", "default")
    return SupervisedSpec(
        name="pretrain",
        section=p,
        model_cfg=model_cfg,
        make_step=functools.partial(_lm_step, loss=loss, grad_accum=p.optim.grad_accum),
        batch=lambda rt: lm_batch(rt, p.batch_size, p.max_len, "pretrain.batch_size"),
        data_seed=cfg.seed + DATA_SEED_OFFSETS["pretrain"],
        log_every=cfg.log.every,
        model=None,
    )


def sft_spec(cfg: Config, model_cfg: ModelConfig) -> SupervisedSpec:
    """SFT on demonstrations (`sft.loss`; packed rows with `sft.pack`)."""
    s = cfg.sft
    loss = get_loss("sft", s.loss, **s.loss_kwargs)
    return SupervisedSpec(
        name="sft",
        section=s,
        model_cfg=model_cfg,
        make_step=functools.partial(_lm_step, loss=loss, grad_accum=s.optim.grad_accum),
        batch=lambda rt: lm_batch(rt, s.batch_size, s.max_len, "sft.batch_size", s.pack),
        data_seed=cfg.seed + DATA_SEED_OFFSETS["sft"],
        log_every=cfg.log.every,
        lora=cfg.lora,
    )


def rm_spec(cfg: Config, model_cfg: ModelConfig) -> SupervisedSpec:
    """The reward model (SFT trunk + a fresh head) on K-wise rankings (packed: `rm.pack`)."""
    r = cfg.rm
    loss = get_loss("reward", r.loss, **r.loss_kwargs)
    length = r.max_prompt_len + r.max_completion_len + 1

    def batch(rt: Runtime) -> dict:
        k = ranking_k(r.data, r.k)
        shape = packed_ranking_batch if r.pack else ranking_batch
        return shape(rt, r.batch_size, k, length, "rm.batch_size", False)

    return SupervisedSpec(
        name="rm",
        section=r,
        model_cfg=model_cfg,
        make_step=lambda m: make_reward_step(m, loss, r.optim.grad_accum),
        batch=batch,
        data_seed=cfg.seed + DATA_SEED_OFFSETS["rm"],
        log_every=cfg.log.every,
        model="reward",
        lora=cfg.lora,
        scalar=True,
    )


def dpo_spec(cfg: Config, model_cfg: ModelConfig, name: str = "dpo") -> SupervisedSpec:
    """DPO (or the `dpo.loss` variant): the reference's log-probs precomputed, in the batch."""
    d = cfg.dpo
    loss = get_loss("preference", d.loss, beta=d.beta, **d.loss_kwargs)
    length = d.max_prompt_len + d.max_completion_len + 1

    def batch(rt: Runtime) -> dict:
        k = ranking_k(d.data or cfg.rm.data, cfg.rm.k)
        shape = packed_ranking_batch if d.pack else ranking_batch
        return shape(rt, d.batch_size, k, length, "dpo.batch_size", True)

    return SupervisedSpec(
        name=name,
        section=d,
        model_cfg=model_cfg,
        make_step=lambda m: make_preference_step(m, loss, d.optim.grad_accum),
        batch=batch,
        data_seed=cfg.seed + DATA_SEED_OFFSETS["dpo"],
        log_every=cfg.log.every,
        lora=cfg.lora,
        batch_key="dpo.batch_size",
    )
