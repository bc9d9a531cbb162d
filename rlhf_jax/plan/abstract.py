"""What a plan compiles, without a single weight: model configs (from a checkpoint's
config.json only, or the random model's shape), parameter trees and states as
`jax.ShapeDtypeStruct`s carrying their shardings, batches of the shapes the stages feed, and
the bytes each device holds of any such tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from rlhf_jax.config import Config
from rlhf_jax.loops.build import StageBuild
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.shapes import step_key, with_shardings
from rlhf_jax.loops.stages import random_model_config
from rlhf_jax.models import ModelConfig, param_shapes, scalar_trunk
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.sharding import state_shardings


class _TaskVocab:
    """What `random_model_config` reads of the built-in task's tokenizer: its size (at most
    `task.vocab_size`; BPE may stop short of it) and the special ids it fixes (pad 0, eos 1,
    bos 2), without training it."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def base_model(cfg: Config, path: str | None) -> ModelConfig:
    """The model a stage starts from, as `loops.setup.load_model` would configure it: the
    checkpoint's config.json (weights untouched) with the run's dtypes, remat and
    logits_chunk, or the
    built-in task's random model."""
    if path is None:
        return random_model_config(cfg.model, _TaskVocab(cfg.task.vocab_size))
    m = cfg.model
    return read_hf_config(path).replace(
        param_dtype=m.param_dtype,
        dtype=m.dtype,
        remat=m.remat,
        attention=m.attention,
        logits_chunk=m.logits_chunk,
    )


def reward_model(cfg: Config, path: str) -> ModelConfig:
    """A reward-model folder as `load_scalar_model` configures it: no LM head in the trunk,
    the run's dtypes, and (as that loader does) no remat switch."""
    m = cfg.model
    return read_hf_config(path).replace(
        param_dtype=m.param_dtype, dtype=m.dtype, tie_embeddings=True, attention=m.attention
    )


def scalar_shapes(model_cfg: ModelConfig) -> dict:
    """`{"trunk", "head"}` of a reward or value model (the trunk without an LM head, as the
    loops build it: `models.scalar_trunk`)."""
    head = jax.ShapeDtypeStruct((model_cfg.d_model,), model_cfg.weight_dtype)
    bias = jax.ShapeDtypeStruct((), model_cfg.weight_dtype)
    return {"trunk": scalar_trunk(param_shapes(model_cfg)), "head": {"kernel": head, "bias": bias}}


def model_params(model_cfg: ModelConfig, runtime: Runtime, scalar: bool = False):
    """`(abstract weights, shardings)` of a decoder, or of a scalar model with `scalar`."""
    shardings = runtime.param_shardings(model_cfg, scalar=scalar)
    shapes = scalar_shapes(model_cfg) if scalar else param_shapes(model_cfg)
    return with_shardings(shapes, shardings), shardings


def abstract_state(
    create: Callable, inputs: tuple, input_shardings: tuple, runtime: Runtime
) -> tuple[Any, Any]:
    """`(abstract state, its shardings)`: `sharding.init_sharded_state` without computing
    anything (the same `create`, the same sharding rule for every leaf)."""
    shapes = jax.eval_shape(create, *inputs)
    shardings = state_shardings(shapes, runtime.mesh, *zip(inputs, input_shardings))
    return with_shardings(shapes, shardings), shardings


def abstract_stage(build: StageBuild, runtime: Runtime) -> tuple[Any, Any, Any]:
    """`(assembly, state, state shardings)` of `build` as ShapeDtypeStructs (sharded), nothing
    allocated: the stage's own `assemble` under `jax.eval_shape`, its own programs with their
    abstract arguments. Fills the build's `detail`, `facts` and `program_list`."""
    starts = {
        name: model_params(s.config, runtime, s.scalar)[0] for name, s in build.starts.items()
    }
    box = {}

    def run(starts, key):
        box["a"] = a = build.assemble(starts, key)
        return a.inputs, a.frozen, a.kept

    inputs, frozen, kept = jax.eval_shape(run, starts, step_key(runtime))
    a = box["a"]
    a.inputs = tuple(with_shardings(x, s) for x, s in zip(inputs, a.input_shardings))
    a.frozen = None if frozen is None else with_shardings(frozen, a.frozen_shardings)
    a.kept = _kept(kept, starts)
    a.info = {k: v for k, v in a.info.items() if k != "weights"}  # (traced: not for use)
    state, state_sh = abstract_state(a.create, a.inputs, a.input_shardings, runtime)
    build.detail = build.describe(state, a)
    build.facts = {**build.make_facts(), "lora_on": a.info["lora"]}
    build.program_list = build.programs(a, state_sh)
    build.inputs(a, state, build.program_list)
    return a, state, state_sh


def _kept(kept: Any, starts: dict) -> Any:
    """The kept trees with the shardings of the starting weights they are."""
    if kept is None:
        return None
    shardings = {k: jax.tree.map(lambda x: x.sharding, v) for k, v in starts.items()}
    return with_shardings(kept, {k: shardings[k] for k in kept})
