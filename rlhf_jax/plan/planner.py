"""The plan: which stages the config runs, each stage's programs compiled on abstract inputs,
and XLA's memory analysis turned into the parts of a per-device peak."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax

from rlhf_jax import stage_registry
from rlhf_jax.config import Config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.build import RESIDENT_ROLES, Program, StageBuild
from rlhf_jax.loops.build_rl import RLBuildSpec, rl_build, uses_ptx
from rlhf_jax.loops.build_supervised import (
    dpo_spec,
    pretrain_spec,
    rm_spec,
    sft_spec,
    supervised_build,
)
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.shapes import nbytes
from rlhf_jax.plan import abstract as ab
from rlhf_jax.plan.correction import compile_corrected
from rlhf_jax.steps import RLAlgorithm, TrainState

# Every stage reports every part (0 where absent), so the JSON has one shape. They sum to the
# stage's peak.
PARTS = (
    "params",  # trainable weights (policy; + critic in RL)
    "optimizer",  # Adam's moments and counters
    "ema",  # RL's EMA of the policy weights
    "frozen",  # weights read, never trained: RL's reference and reward model, LoRA's base
    "kept_weights",  # the stage's starting weights, kept by the loop beside the state's copy
    "kv_cache",  # the generation cache (RL's sampling)
    "activations",  # XLA's temporaries less the cache: activations, gradients, logits, ...
    "batch",  # the program's other inputs and outputs: batches, rollouts, metrics
)


@dataclasses.dataclass
class ProgramPlan:
    name: str
    peak: int
    parts: dict[str, int]
    seconds: float  # lowering + compiling
    # XLA:CPU's float32 copies of bf16 weights that an accelerator does not make, taken out of
    # `peak` and `parts["activations"]` (plan/correction.py); 0 when the correction does not
    # apply. `peak + cpu_copies` is XLA:CPU's own figure.
    cpu_copies: int = 0
    # A fused program's phases (`Program.phases`): each one's temporaries (its KV cache
    # included), compiled alone. Filled only for the stage's peak program, the one whose
    # split the advice needs (`plan.advice.experience_phases` estimates it elsewhere).
    phases: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StagePlan:
    name: str
    programs: list[ProgramPlan]
    build: StageBuild
    # An optimizer update's temporaries and gradients: the part of a training program's
    # temporaries that no activation switch (remat, micro-batches) can remove.
    floor: int = 0

    @property
    def peak_program(self) -> ProgramPlan:
        return max(self.programs, key=lambda p: p.peak)

    @property
    def peak(self) -> int:
        return self.peak_program.peak

    @property
    def parts(self) -> dict[str, int]:
        return self.peak_program.parts

    @property
    def xla_cpu_peak(self) -> int:
        """The peak by XLA:CPU's own figures, before the accelerator correction."""
        return max(p.peak + p.cpu_copies for p in self.programs)


def stage_names(cfg: Config) -> list[str]:
    """The stages the config's run would execute, in order, named as the CLI names them: the
    registered stages (rlhf_jax/stage_registry.py) with a builder whose `planned(cfg)` holds
    (pretraining only for the built-in task's random model, DPO only when a command runs it)."""
    return [s.name for s in stage_registry.stages() if s.build is not None and s.planned(cfg)]


def _reward_cfg(cfg: Config, algo: RLAlgorithm):
    """The reward model RL reads: `ppo.reward_model`'s folder, or (pipeline) the RM trained
    from the SFT model; None when a reward function scores."""
    if algo.reward_fn is not None:
        return None
    if cfg.ppo.reward_model is not None:
        return ab.reward_model(cfg, cfg.ppo.reward_model)
    return ab.base_model(cfg, cfg.rm.init or cfg.model.path)


def build_rl(cfg: Config, runtime: Runtime, algo: RLAlgorithm) -> StageBuild:
    """The RL stage from the SFT policy, with ptx batches whenever `ptx.coef > 0` (the
    pipeline has them; `rlhf-jax ppo` then requires `ptx.data`)."""
    policy_cfg = ab.base_model(cfg, cfg.ppo.policy or cfg.model.path)
    spec = RLBuildSpec(
        cfg=cfg,
        algo=algo,
        policy_cfg=policy_cfg,
        reward_cfg=_reward_cfg(cfg, algo),
        special=(policy_cfg.eos_ids or (0,), policy_cfg.pad_token_id or 0),
        use_ptx=uses_ptx(cfg, True),
    )
    return rl_build(spec, runtime)


# The supervised stages as the loop builds them, on the abstract shapes of their models.
def build_pretrain(cfg: Config, runtime: Runtime, algo: RLAlgorithm) -> StageBuild:
    return supervised_build(pretrain_spec(cfg, ab.base_model(cfg, None)), runtime)


def build_sft(cfg: Config, runtime: Runtime, algo: RLAlgorithm) -> StageBuild:
    return supervised_build(sft_spec(cfg, ab.base_model(cfg, cfg.model.path)), runtime)


def build_rm(cfg: Config, runtime: Runtime, algo: RLAlgorithm) -> StageBuild:
    model = ab.base_model(cfg, cfg.rm.init or cfg.model.path)
    return supervised_build(rm_spec(cfg, model), runtime)


def build_dpo(cfg: Config, runtime: Runtime, algo: RLAlgorithm) -> StageBuild:
    model = ab.base_model(cfg, cfg.dpo.policy or cfg.model.path)
    return supervised_build(dpo_spec(cfg, model), runtime)


def stage_table(
    cfg: Config, runtime: Runtime, algo: RLAlgorithm | None = None
) -> dict[str, Callable[[], StageBuild]]:
    """Every registered stage with a builder -> a function building it as the loop does
    (model configs read when called), whether the config runs it or not. `algo`: the run's
    RL algorithm (else resolved from `cfg.ppo` when a stage is first built, once for all)."""
    resolved = [algo]

    def the_algo() -> RLAlgorithm:
        if resolved[0] is None:
            resolved[0] = RLAlgorithm.from_config(cfg.ppo)
        return resolved[0]

    def bound(build):
        return lambda: stage_registry.load(build)(cfg, runtime, the_algo())

    return {s.name: bound(s.build) for s in stage_registry.stages() if s.build is not None}


def builders(
    cfg: Config, runtime: Runtime, algo: RLAlgorithm | None = None
) -> dict[str, Callable[[], StageBuild]]:
    """The stages the config runs (`stage_names`) -> a function building each."""
    table = stage_table(cfg, runtime, algo)
    names = stage_names(cfg)
    if not names:
        raise RlhfJaxError(
            "nothing to plan: every stage of this config has 0 steps (pretrain.steps, "
            "sft.steps, rm.steps, ppo.iterations, dpo.steps)"
        )
    return {name: table[name] for name in names}


def totals(detail: dict[str, int]) -> dict[str, int]:
    """Parts summed over models: "params/policy" + "params/critic" -> "params"."""
    out: dict[str, int] = {}
    for key, value in detail.items():
        part = key.split("/")[0]
        out[part] = out.get(part, 0) + value
    return out


@dataclasses.dataclass
class Compiled:
    """A program compiled on its abstract arguments: XLA's own executable, and the one its
    accelerator-corrected figure comes from (`plan.correction`; the same when it does not
    apply)."""

    raw: object
    corrected: object
    seconds: float


def compile_program(program: Program) -> Compiled:
    """Lowered and compiled on the abstract arguments; on XLA:CPU with bf16 values, compiled a
    second time without hoisting (`plan.correction`), kept when its temporaries are smaller."""
    t0 = time.time()
    lowered = program.jitted.lower(*program.args)
    raw = lowered.compile()
    corrected = compile_corrected(lowered)
    if corrected is None or _temp(corrected) >= _temp(raw):
        corrected = raw
    return Compiled(raw, corrected, time.time() - t0)


def _temp(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        raise RlhfJaxError("this JAX backend gives no memory analysis of compiled programs")
    return int(m.temp_size_in_bytes)


def plan_program(
    program: Program, resident: dict[str, int], compiled: Compiled | None = None
) -> ProgramPlan:
    """Compile `program` (nothing is allocated) and split its per-device peak into parts.

    Peak = what lives through the stage (`resident`) + this call's other arguments and
    outputs + its temporaries: XLA's arguments + outputs + temporaries - donated aliases, with
    the resident state counted once even when the call does not take all of it. The
    temporaries are the accelerator-corrected ones (`Compiled.corrected`)."""
    if compiled is None:
        compiled = compile_program(program)
    m = compiled.corrected.memory_analysis()
    in_resident = sum(
        nbytes(arg) for arg, role in zip(program.args, program.roles) if role in RESIDENT_ROLES
    )
    io = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes - in_resident
    temp = int(m.temp_size_in_bytes)
    kv = min(program.kv_cache, temp)
    parts = {p: int(resident.get(p, 0)) for p in PARTS}
    parts.update(kv_cache=kv, activations=temp - kv, batch=max(int(io), 0))
    copies = _temp(compiled.raw) - temp
    return ProgramPlan(program.name, sum(parts.values()), parts, compiled.seconds, copies)


def _is_train_state(x) -> bool:
    return isinstance(x, TrainState)


def _apply_temps(state: TrainState, shardings: TrainState) -> int:
    """XLA's temporaries for applying gradients to one TrainState (donated, as the steps)."""
    apply = jax.jit(
        lambda ts, grads: ts.apply_gradients(grads),
        in_shardings=(shardings, shardings.params),
        out_shardings=shardings,
        donate_argnums=0,
    )
    m = apply.lower(state, state.params).compile().memory_analysis()
    return int(m.temp_size_in_bytes) if m is not None else 0


def optimizer_floor(state, state_sh) -> int:
    """Per device, a lower bound of a training program's temporaries at its optimizer update:
    every TrainState's gradients, plus the largest of their updates' own temporaries (each
    compiled alone; Adam, clipping and the non-finite guard need several weight-sized
    buffers at once, whatever the batch)."""
    states = [x for x in jax.tree.leaves(state, is_leaf=_is_train_state) if _is_train_state(x)]
    shardings = [
        x for x in jax.tree.leaves(state_sh, is_leaf=_is_train_state) if _is_train_state(x)
    ]
    if not states:
        return 0
    temps = max(_apply_temps(ts, sh) for ts, sh in zip(states, shardings))
    return nbytes([ts.params for ts in states]) + temps


def plan_stages(
    cfg: Config,
    runtime: Runtime,
    progress: Callable[[str], None] = lambda _: None,
    only: str | None = None,
) -> list[StagePlan]:
    """Every stage of the run (or the one named `only`), compiled program by program
    (`progress` hears of each). All stages are built (and their batch sizes checked against
    the mesh) before any compiles, so a bad setting fails at once."""
    built = []
    for name, build_fn in builders(cfg, runtime).items():
        if only is not None and name != only:
            continue
        build = build_fn()
        _, state, state_sh = ab.abstract_stage(build, runtime)
        built.append((build, state, state_sh))
    plans = []
    for i, (build, state, state_sh) in enumerate(built, 1):
        where = f"[{i}/{len(built)}] {build.name}"
        resident = totals(build.detail)
        planned = []
        for program in build.program_list:
            progress(f"{where}: compiling {program.name} ...")
            planned.append(plan_program(program, resident))
            progress(f"{where}: {program.name} in {planned[-1].seconds:.1f} s")
        stage = StagePlan(build.name, planned, build, optimizer_floor(state, state_sh))
        _plan_phases(stage, where, progress)
        plans.append(stage)
    return plans


def _plan_phases(stage: StagePlan, where: str, progress: Callable[[str], None]) -> None:
    """When the stage's peak program is fused from phases (RL's experience: sampling, then
    the reference, reward and critic forwards), each phase compiled alone: a switch that
    shrinks one phase lowers the program only as far as the other phase allows."""
    peak = stage.peak_program
    program = next(p for p in stage.build.program_list if p.name == peak.name)
    for phase in program.phases:
        progress(f"{where}: compiling {peak.name}'s {phase.name} phase alone ...")
        parts = plan_program(phase, {}).parts
        peak.phases[phase.name] = parts["kv_cache"] + parts["activations"]
