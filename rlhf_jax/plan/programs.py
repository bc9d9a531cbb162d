"""A stage's compiled programs, built as its loop builds them but on abstract inputs.

A stage is described twice over the same code. `assemble(start, key)` turns the starting
weights into what the loop's `init` hands `init_sharded_state` (through the loops' own
`stage_weights`, `TrainState.create`, `init_rl_state`), plus the frozen weights and the
starting weights the loop keeps alive; the planner runs it under `jax.eval_shape` (nothing
allocated), `measure` on real arrays. `programs(...)` then jits the loops' step functions with
the loops' jit wrappers (`jit_step`, `jit_experience`, ... ). When a loop changes how it builds
a stage, the function here that mirrors it (named in its docstring) changes with it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from rlhf_jax.config import Config, LoraConfig
from rlhf_jax.loops.adapters import adapter_key, stage_weights
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import frozen_apart
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig, init_params, init_scalar_head, scalar_trunk
from rlhf_jax.plan import abstract as ab
from rlhf_jax.sharding import batch_sharding, jit_step
from rlhf_jax.steps import (
    TrainState,
    make_optimizer,
    make_preference_step,
    make_reward_step,
    make_sft_step,
)

# Argument roles: what a program's argument is, so that the stage's resident weights are
# counted once, and `measure` knows what to pass.
RESIDENT_ROLES = ("state", "frozen", "policy_weights")


@dataclasses.dataclass
class Program:
    name: str
    jitted: Callable
    args: tuple  # abstract arguments
    roles: tuple[str, ...]  # one per argument
    training: bool  # has a backward pass (remat and micro-batches apply)
    kv_cache: int = 0  # bytes per device of the KV cache it builds


@dataclasses.dataclass(frozen=True)
class Forward:
    """A trained forward pass of an update: whose, on how many global rows per optimizer
    update, over how many tokens, with LM logits at how many positions (0: a scalar model)."""

    model: ModelConfig
    rows: int
    length: int
    logits: int


@dataclasses.dataclass(frozen=True)
class Start:
    """A starting model of the stage (loaded from a folder, or trained by the stage before)."""

    config: ModelConfig
    scalar: bool  # a reward / value model {"trunk", "head"}

    def init(self, key: jax.Array) -> Any:
        if not self.scalar:
            return init_params(self.config, key)
        k1, k2 = jax.random.split(key)
        trunk = scalar_trunk(init_params(self.config, k1))
        return {"trunk": trunk, "head": init_scalar_head(self.config, k2)}


@dataclasses.dataclass
class Assembly:
    """What a stage's `init` builds from its starting weights: `init_sharded_state(create,
    inputs, input_shardings)`; `frozen` (RL's `Frozen`, or None) and `kept` (starting
    weights alive beside them, not in the state or `frozen`); `info`: model configs etc."""

    create: Callable
    inputs: tuple
    input_shardings: tuple
    frozen: Any = None
    frozen_shardings: Any = None
    kept: Any = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageBuild:
    """A stage ready to plan (abstract trees) or to measure (`assemble` on real arrays)."""

    name: str
    starts: dict[str, Start]
    assemble: Callable[[dict, jax.Array], Assembly]
    programs: Callable[[Assembly, Any, Any], list[Program]]  # (abstract assembly, state, sh)
    describe: Callable[[Any, Assembly], dict[str, int]]  # (state, assembly) -> detail
    facts: dict[str, Any]
    detail: dict[str, int] = dataclasses.field(default_factory=dict)  # filled by `abstract`
    program_list: list[Program] = dataclasses.field(default_factory=list)

    def abstract(self, runtime: Runtime) -> tuple[Assembly, Any, Any]:
        """`(assembly, state, state shardings)` of ShapeDtypeStructs (sharded), nothing
        allocated; also fills `detail` and `program_list`."""
        starts = {
            name: ab.model_params(s.config, runtime, s.scalar)[0] for name, s in self.starts.items()
        }
        box = {}

        def run(starts, key):
            box["a"] = a = self.assemble(starts, key)
            return a.inputs, a.frozen, a.kept

        inputs, frozen, kept = jax.eval_shape(run, starts, ab.step_key(runtime))
        a = box["a"]
        a = dataclasses.replace(
            a,
            inputs=tuple(_sharded(x, s) for x, s in zip(inputs, a.input_shardings)),
            frozen=_sharded(frozen, a.frozen_shardings),
            kept=_kept(kept, starts),
        )
        state, state_sh = ab.abstract_state(a.create, a.inputs, a.input_shardings, runtime)
        self.detail = self.describe(state, a)
        self.program_list = self.programs(a, state, state_sh)
        return a, state, state_sh


def _sharded(tree: Any, shardings: Any) -> Any:
    return None if tree is None else ab.with_shardings(tree, shardings)


def _kept(kept: Any, starts: dict) -> Any:
    """The kept trees with the shardings of the starting weights they are."""
    if kept is None:
        return None
    shardings = {k: jax.tree.map(lambda x: x.sharding, v) for k, v in starts.items()}
    return ab.with_shardings(kept, {k: shardings[k] for k in kept})


def train_state_detail(ts: Any, who: str) -> dict[str, int]:
    """A TrainState's bytes per device by part: its weights, optimizer, frozen base."""
    if ts is None:
        return {}
    return {
        f"params/{who}": ab.nbytes(ts.params),
        f"optimizer/{who}": ab.nbytes(ts.opt_state) + ab.nbytes(ts.step),
        f"frozen/{who}_base": ab.nbytes(ts.frozen),
    }


def lora_of(cfg: Config, model: str | None) -> LoraConfig:
    """The run's LoRA settings for a stage training `model` (pretraining: always in full)."""
    return cfg.lora if model is not None else LoraConfig()


def supervised(
    cfg: Config,
    name: str,
    section: Any,
    start: Start,
    make_step: Callable[[ModelConfig], Callable],
    batch: dict,
    runtime: Runtime,
    model: str | None,
) -> StageBuild:
    """`loops.stages.train_lm` / `train_reward_model` / `loops.preference.train_preference`
    through `loops.train.supervised_stage`: `stage_weights`, then a TrainState of the trained
    weights (fresh buffers) while the caller keeps the starting weights; under LoRA the base
    is those very buffers, passed to the step as its own never-donated argument; one jitted
    step, the old state donated."""
    tx = make_optimizer(section.optim, section.steps)
    lora, who = lora_of(cfg, model), model or "policy"

    def create(p):  # one function object: every `init_sharded_state` of it compiles once
        return TrainState.create(p, tx)

    def assemble(starts: dict, key: jax.Array) -> Assembly:
        w = stage_weights(
            lora, who, start.config, starts["model"], adapter_key(key), runtime, start.scalar
        )
        return Assembly(
            create,
            (w.trained,),
            (w.trained_shardings,),
            frozen=w.frozen,
            frozen_shardings=w.frozen_shardings,
            # Under LoRA the starting weights are the frozen base itself (a scalar model's
            # head, copied into the trained part, is left out as negligible).
            kept=None if w.frozen is not None else {"model": starts["model"]},
            info={"config": w.config, "lora": w.frozen is not None},
        )

    def detail(state, a: Assembly) -> dict[str, int]:
        return {
            **train_state_detail(state, who),
            f"frozen/{who}_base": ab.nbytes(a.frozen),
            f"kept_weights/{who}": ab.nbytes(a.kept),
        }

    def programs(a: Assembly, state, state_sh) -> list[Program]:
        rows = batch_sharding(runtime.mesh, runtime.rules, 1)
        step = make_step(a.info["config"])
        key = ab.step_key(runtime)
        if a.frozen is None:
            jitted = jit_step(step, state_sh, rows, activation_rules=runtime.activation_rules)
            return [Program("step", jitted, (state, batch, key), ("state", "batch", "key"), True)]
        jitted = jit_step(
            frozen_apart(step),
            state_sh,
            rows,
            frozen_shardings=a.frozen_shardings,
            activation_rules=runtime.activation_rules,
        )
        args, roles = (state, a.frozen, batch, key), ("state", "frozen", "batch", "key")
        return [Program("step", jitted, args, roles, training=True)]

    ids = batch["input_ids"]
    rows = ids.shape[0] * (ids.shape[1] if ids.ndim == 3 else 1)  # rankings: K rows each
    forward = Forward(start.config, rows, ids.shape[-1], 0 if start.scalar else ids.shape[-1])
    facts = {
        "model": model,
        "accum_key": f"{name}.optim.grad_accum",
        "grad_accum": section.optim.grad_accum,
        "batch_size": section.batch_size,
        "forwards": (forward,),
    }
    return StageBuild(name, {"model": start}, assemble, programs, detail, facts)


def pretrain(cfg: Config, model_cfg: ModelConfig, runtime: Runtime) -> StageBuild:
    """`loops.stages.train_lm` for the built-in task's random base model."""
    p = cfg.pretrain
    batch = ab.lm_batch(runtime, p.batch_size, p.max_len, "pretrain.batch_size")
    step = functools.partial(
        _sft_step, loss=get_loss("sft", "default"), grad_accum=p.optim.grad_accum
    )
    return supervised(cfg, "pretrain", p, Start(model_cfg, False), step, batch, runtime, None)


def _sft_step(model_cfg: ModelConfig, loss, grad_accum: int):
    return make_sft_step(model_cfg, loss, grad_accum)


def sft(cfg: Config, model_cfg: ModelConfig, runtime: Runtime) -> StageBuild:
    """`loops.stages.train_lm` for SFT."""
    s = cfg.sft
    batch = ab.lm_batch(runtime, s.batch_size, s.max_len, "sft.batch_size", s.pack)
    loss = get_loss("sft", s.loss, **s.loss_kwargs)
    step = functools.partial(_sft_step, loss=loss, grad_accum=s.optim.grad_accum)
    return supervised(cfg, "sft", s, Start(model_cfg, False), step, batch, runtime, "policy")


def rm(cfg: Config, model_cfg: ModelConfig, runtime: Runtime) -> StageBuild:
    """`loops.stages.train_reward_model`: the SFT trunk + a fresh head on K-wise rankings."""
    r = cfg.rm
    length = r.max_prompt_len + r.max_completion_len + 1
    k = ab.ranking_k(r.data, r.k)
    batch = ab.ranking_batch(runtime, r.batch_size, k, length, "rm.batch_size", False)
    loss = get_loss("reward", r.loss, **r.loss_kwargs)

    def step(m: ModelConfig):
        return make_reward_step(m, loss, r.optim.grad_accum)

    return supervised(cfg, "rm", r, Start(model_cfg, True), step, batch, runtime, "reward")


def dpo(cfg: Config, model_cfg: ModelConfig, runtime: Runtime) -> StageBuild:
    """`loops.preference.train_preference`: reference log-probs precomputed, in the batch."""
    d = cfg.dpo
    length = d.max_prompt_len + d.max_completion_len + 1
    k = ab.ranking_k(d.data or cfg.rm.data, cfg.rm.k)
    batch = ab.ranking_batch(runtime, d.batch_size, k, length, "dpo.batch_size", True)
    loss = get_loss("preference", d.loss, beta=d.beta, **d.loss_kwargs)

    def step(m: ModelConfig):
        return make_preference_step(m, loss, d.optim.grad_accum)

    return supervised(cfg, "dpo", d, Start(model_cfg, False), step, batch, runtime, "policy")
