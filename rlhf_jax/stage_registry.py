"""Every stage a run can have, declared once: `rlhf-jax`'s stage subcommands, the settings
checks of loops/usage.py and `rlhf-jax plan`'s list of stages all iterate over this table.

A stage is one `StageDef`: its name (the subcommand and the plan's stage name), its help
line, the config sections its command owns, the command (`run(cfg, out_dir, *, algo) ->
folder`, `algo`: the run's `RLAlgorithm`, resolved once when the config loaded), the
builder `plan` compiles (`build(cfg, runtime, algo) -> StageBuild`, loops/build.py), when a
config's run includes it, and the rules of settings its command never reads. A fork adds a
stage with one `register_stage` call from its own module (imported before `cli.main` runs),
as tests/fork_stage.py does; no library file changes.

Functions may be given as `"package.module:attr"`, imported when first used: this module
imports no JAX, so the CLI builds its parser (and `--help` answers) without loading it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf_jax.errors import RlhfJaxError

if TYPE_CHECKING:
    from rlhf_jax.config import Config

Ref = str | Callable[..., Any]  # a function, or "package.module:attr" naming one


@dataclasses.dataclass(frozen=True)
class StageDef:
    """One stage. `run` None: no subcommand of its own (pretraining runs only inside the
    pipeline); `build` None: `plan` has nothing to compile for it."""

    name: str
    help: str
    sections: tuple[str, ...]  # config sections/keys the command owns (read or refused)
    run: Ref | None = None  # fn(cfg, out_dir, *, algo) -> Path of what it wrote
    build: Ref | None = None  # fn(cfg, runtime, algo) -> loops.build.StageBuild
    planned: Callable[[Config], bool] = lambda cfg: True  # whether cfg's run includes it
    unread: Ref | tuple = ()  # loops.usage.Unread rules: keys the command does not read
    not_owned: tuple[str, ...] = ()  # keys inside `sections` that are another command's input


_STAGES: dict[str, StageDef] = {}


def register_stage(stage: StageDef) -> StageDef:
    """Add `stage` to the table (after those registered before it: the plan's order)."""
    if stage.name in _STAGES and _STAGES[stage.name] != stage:
        raise RlhfJaxError(f"a stage named {stage.name!r} is registered already")
    _STAGES[stage.name] = stage
    return stage


def unregister_stage(name: str) -> None:
    """Remove a stage (a test's toy stage, when the test ends)."""
    _STAGES.pop(name, None)


def stages() -> list[StageDef]:
    """Every registered stage, in registration order."""
    return list(_STAGES.values())


def stage(name: str) -> StageDef | None:
    return _STAGES.get(name)


def load(ref: Ref) -> Any:
    """The object `ref` names (`"package.module:attr"`), or `ref` itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_PLAN = "rlhf_jax.plan.planner"
_USAGE = "rlhf_jax.loops.usage"
_COMMANDS = "rlhf_jax.loops.commands"
_RUNTIME = ("log", "checkpoint", "mesh", "distributed")

for _stage in (
    StageDef(
        "pretrain",
        "",  # the built-in task's random model only, inside the pipeline
        (),
        build=f"{_PLAN}:build_pretrain",
        planned=lambda cfg: cfg.model.path is None and cfg.pretrain.steps > 0,
    ),
    StageDef(
        "sft",
        "fine-tune model.path on sft.data (writes OUTPUT/sft)",
        ("seed", "model", "data", "sft", "lora", *_RUNTIME),
        run=f"{_COMMANDS}:run_sft",
        build=f"{_PLAN}:build_sft",
        planned=lambda cfg: cfg.sft.steps > 0,
        unread=f"{_USAGE}:SFT_COMMAND",
    ),
    StageDef(
        "rm",
        "train a reward model from rm.init on rm.data (writes OUTPUT/rm)",
        ("seed", "model", "data", "rm", "sft.data", "lora", *_RUNTIME),
        run=f"{_COMMANDS}:run_rm",
        build=f"{_PLAN}:build_rm",
        planned=lambda cfg: cfg.rm.steps > 0,
        unread=f"{_USAGE}:RM_COMMAND",
    ),
    StageDef(
        "ppo",
        "RL from ppo.policy against ppo.reward_model or ppo.reward_fn: PPO-ptx by default, "
        "GRPO, RLOO, REINFORCE++, ... by config (writes OUTPUT/policy)",
        ("seed", "model", "data", "ppo", "ptx", "lora", *_RUNTIME),
        run=f"{_COMMANDS}:run_ppo",
        build=f"{_PLAN}:build_rl",
        planned=lambda cfg: cfg.ppo.iterations > 0,
        unread=f"{_USAGE}:PPO_COMMAND",
        not_owned=("model.path",),
    ),
    StageDef(
        "dpo",
        "offline preference optimisation from dpo.policy on the rankings of dpo.data (or "
        "rm.data): DPO over every ranked pair by default, IPO, cDPO, robust DPO by config "
        "(writes OUTPUT/policy)",
        ("seed", "model", "data", "dpo", "rm.data", "lora", *_RUNTIME),
        run=f"{_COMMANDS}:run_dpo",
        build=f"{_PLAN}:build_dpo",
        # only when a command runs it: `rlhf-jax dpo`'s dpo.policy, or compare.preference
        planned=lambda cfg: cfg.dpo.steps > 0 and bool(cfg.dpo.policy or cfg.compare.preference),
        unread=f"{_USAGE}:DPO_COMMAND",
        not_owned=("model.path",),
    ),
):
    register_stage(_stage)
