"""What a stage is, built once for the loop and the planner alike.

A stage's builder (`build_supervised.py`, `build_rl.py`) returns a `StageBuild`: its starting
models, `assemble(starts, key)` (the starting weights turned into what `init_sharded_state`
takes, the frozen weights placed), `programs(assembly, state shardings)` (its jitted programs),
`inputs(...)` (the abstract arguments each program is called with: its batches' shapes) and
what the planner reports of it (`describe`, `facts`). The loops run it on real arrays
(`assemble` on the loaded weights, `init_sharded_state`, the jitted programs wrapped in
`CompiledOnce`); `plan/` runs the same `assemble` under `jax.eval_shape` and compiles the
same jitted programs on the abstract arguments. A change to how a stage is built is made
once, here, and `tests/loops/test_build_parity.py` compares the two ways' lowered programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from rlhf_jax.loops.shapes import nbytes
from rlhf_jax.models import ModelConfig, init_params, init_scalar_head, scalar_trunk

# Argument roles: what a program's argument is, so that the stage's resident weights are
# counted once, and `plan.measure` knows what to pass.
RESIDENT_ROLES = ("state", "frozen", "policy_weights")


@dataclasses.dataclass
class Program:
    """One jitted program of a stage. `args`: its abstract arguments (filled for the plan by
    the stage's `inputs`; the loop calls it on real ones)."""

    name: str
    jitted: Callable
    roles: tuple[str, ...]  # one per argument
    training: bool  # has a backward pass (remat and micro-batches apply)
    kv_cache: int = 0  # bytes per device of the KV cache it builds
    args: tuple = ()
    # The RL update with `ppo.pack_update`: `PackLayout -> jitted` for the packed shapes a
    # run reaches (`jitted` is the largest, the one the plan compiles); else None.
    jitted_for_layout: Callable | None = None
    # A fused program's phases as programs of their own (RL's experience: sample, then
    # finish), never run: the plan compiles them alone to split the fused program's
    # temporaries between them (`plan.advice.experience_phases`).
    phases: tuple[Program, ...] = ()


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
        """Random weights of its shape (the plan's measured check stands them for loaded)."""
        if not self.scalar:
            return init_params(self.config, key)
        k1, k2 = jax.random.split(key)
        trunk = scalar_trunk(init_params(self.config, k1))
        return {"trunk": trunk, "head": init_scalar_head(self.config, k2)}


@dataclasses.dataclass
class Assembly:
    """What a stage's `init` builds from its starting weights: `init_sharded_state(create,
    inputs, input_shardings)`; `frozen` (RL's `Frozen`, LoRA's base, or None) and `kept`
    (starting weights alive beside them, not in the state or `frozen`); `info`: model
    configs, the `StageWeights` of each trained model, etc."""

    create: Callable
    inputs: tuple
    input_shardings: tuple
    frozen: Any = None
    frozen_shardings: Any = None
    kept: Any = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageBuild:
    """A stage: run by its loop on real arrays, planned on abstract ones (`plan.abstract`).

    programs(assembly, state shardings) -> [Program]: the jitted programs, in call order.
    inputs(assembly, abstract state, programs): fills each program's abstract `args`.
    describe(state, assembly) -> {part/model: bytes per device}; facts() -> what the plan's
    advice reads (trained forwards, batch size, grad_accum key, ...)."""

    name: str
    starts: dict[str, Start]
    assemble: Callable[[dict, jax.Array], Assembly]
    programs: Callable[[Assembly, Any], list[Program]]
    inputs: Callable[[Assembly, Any, list[Program]], None]
    describe: Callable[[Any, Assembly], dict[str, int]]
    make_facts: Callable[[], dict[str, Any]]
    # Filled by the plan (`plan.abstract.abstract_stage`):
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    detail: dict[str, int] = dataclasses.field(default_factory=dict)
    program_list: list[Program] = dataclasses.field(default_factory=list)


def train_state_detail(ts: Any, who: str) -> dict[str, int]:
    """A TrainState's bytes per device by part: its weights, optimizer, frozen base."""
    if ts is None:
        return {}
    return {
        f"params/{who}": nbytes(ts.params),
        f"optimizer/{who}": nbytes(ts.opt_state) + nbytes(ts.step),
        f"frozen/{who}_base": nbytes(ts.frozen),
    }
