"""The one host loop every stage runs on (pretraining, SFT, the reward model, DPO and RL),
driven by a small description of the stage (`Stage`).

The loop owns what every stage needs and none should write again: the state created in its
shardings, resume from the newest checkpoint, one program call per step with the step's key,
the NaN/Inf skip guard, logging and the progress bar, saving (and SIGTERM, through the
checkpoints), and the end-of-stage check that something was learned. A stage says only how to
build its state, how to take one step, and which optimizers to watch.

Adding a stage takes a builder (`loops/build.py`), a `Stage` and a row in the CLI's table of
commands (a `SupervisedSpec` and `run_supervised` already cover any `step(state, batch, key)`
over a dataset).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

from rlhf_jax.data import batches
from rlhf_jax.loops.adapters import StageWeights, announce
from rlhf_jax.loops.build import Assembly, StageBuild
from rlhf_jax.loops.build_supervised import SupervisedSpec, supervised_build
from rlhf_jax.loops.guard import SkipGuard
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import init_sharded_state, shard_tree
from rlhf_jax.steps import TrainState

# Metrics shown in the progress bar when present.
BAR_KEYS = (
    "sft/loss",
    "rm/loss",
    "rm/accuracy",
    "dpo/loss",
    "dpo/accuracy",
    "objective/scores",
    "objective/kl",
)

StepFn = Callable[[Any, int, jax.Array], tuple[Any, dict]]


class CompiledOnce:
    """A jitted function compiled ahead of time on its first call's arguments, so that XLA's
    memory analysis of the very program that runs is known without a second compile."""

    def __init__(self, jitted: Callable):
        self.jitted, self.compiled = jitted, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
        return self.compiled(*args)

    def peak_bytes(self) -> int:
        """Per device: arguments + outputs + temporaries, less what donation aliases."""
        m = self.compiled.memory_analysis() if self.compiled is not None else None
        if m is None:
            return 0
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return int(total - m.alias_size_in_bytes)


def short_metrics(row: dict[str, float]) -> dict[str, str]:
    return {k.split("/", 1)[-1]: f"{v:.3g}" for k, v in row.items() if k in BAR_KEYS}


@dataclasses.dataclass
class Stage:
    """What the host loop needs to run a stage.

    init: `() -> (state, state shardings)`, the state built directly in its shardings.
    program: `(state shardings, first step) -> step(state, i, key) -> (state, metrics)`, the
        compiled program(s) of one step with their batches from step `first` on (a resumed
        stage continues the data where it stopped).
    learned: `state -> {guard prefix: TrainState}`, the optimizers whose skip counters are
        watched (`<prefix>/skipped_updates`, `<prefix>/consecutive_skips`) and which must
        have taken at least one real update by the end.
    limits: `{guard prefix: max consecutive skips}`.
    log_every: steps between metric lines. With `sync`, every step's metrics are read as soon
        as it ends (long steps such as an RL iteration); otherwise one step late, so the
        device never waits for the host.
    """

    name: str
    n_steps: int
    init: Callable[[], tuple[Any, Any]]
    program: Callable[[Any, int], StepFn]
    learned: Callable[[Any], dict[str, TrainState]]
    limits: dict[str, int]
    log_every: int = 1
    sync: bool = False


def run_stage(
    stage: Stage,
    key: jax.Array,
    logger: MetricsLogger,
    checkpoints: StageCheckpoints | None = None,
):
    """Run `stage` from its newest checkpoint (if any) to `n_steps`; returns the final state.
    Step i gets `fold_in(key, i)`; `max consecutive skips` in a row stop the stage with
    `TrainingDiverged` before anything after them is saved."""
    state, shardings = stage.init()
    start = 0
    if checkpoints is not None:
        state, start = checkpoints.restore(state, shardings)
    try:  # from here on, an error still closes the checkpoints (no orbax thread left behind)
        step = stage.program(shardings, start)
        latest = checkpoints.latest_step if checkpoints is not None else None
        guard = SkipGuard(stage.name, stage.limits, logger, latest)
        state = _steps(stage, step, state, start, key, logger, checkpoints, guard)
        guard.require_learning(stage.learned(state))
    finally:
        logger.sync()  # at a URL: a stage that stopped (or failed) leaves every line it logged
        if checkpoints is not None:
            checkpoints.close()  # commits a save in flight, also when a step raised
    return state


def _steps(stage, step, state, start, key, logger, checkpoints, guard):
    n = stage.n_steps
    pending = None  # (step, skip counters) not yet checked
    with logger.bar(n, stage.name, initial=start) as bar:
        for i in range(start, n):
            state, metrics = step(state, i, jax.random.fold_in(key, i))
            if pending is not None:
                guard.check(*pending)
            pending = (i + 1, guard.counters(metrics))
            if (i + 1) % stage.log_every == 0 or i + 1 == n:
                bar.set_postfix(short_metrics(logger.log(stage.name, i + 1, metrics)))
            bar.update(1)
            if stage.sync:  # the step's metrics are on the host already: check them now
                guard.check(*pending)
                pending = None
            if checkpoints is not None:
                due = checkpoints.due(i + 1, n)
                if due:
                    logger.sync()  # at a URL: the metrics of a checkpoint's steps go first
                if pending is not None and due:
                    guard.check(*pending)  # never save the step that stops us
                checkpoints.after_step(i + 1, state, n)
    if pending is not None:
        guard.check(*pending)
    return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageRun:
    """Where a stage runs: its key (step i takes `fold_in(key, i)`; its LoRA adapters a key
    no step reaches), logger, runtime, checkpoints; with `lora.save_adapters`, the folder
    a LoRA policy's adapters alone go to and the base model they name."""

    key: jax.Array
    logger: MetricsLogger
    runtime: Runtime
    checkpoints: StageCheckpoints | None = None
    adapter_dir: Any = None
    base_model: str | None = None


def run_supervised(
    spec: SupervisedSpec, params, data: dict | Callable[[int], Iterator[dict]], run: StageRun
) -> tuple[TrainState, StageWeights]:
    """`run_stage` of the supervised stage `spec` from `params` (left intact) over `data`:
    arrays shuffled into `spec.section.batch_size` batches by `spec.data_seed`, or
    `data(start)`, the batches from step `start` on. Returns the final state and what
    trained (`StageWeights.finished` folds LoRA adapters into their base)."""
    section = spec.section
    if callable(data):
        make_batches = data
    else:

        def make_batches(start: int) -> Iterator[dict]:
            return batches(data, section.batch_size, spec.data_seed, start=start)

    build = supervised_build(spec, run.runtime)
    assembly = build.assemble({"model": params}, run.key)
    announce(assembly.info["weights"], spec.name)
    stage = supervised_stage(spec, build, assembly, make_batches, run.runtime)
    state = run_stage(stage, run.key, run.logger, run.checkpoints)
    return state, assembly.info["weights"]


def supervised_stage(
    spec: SupervisedSpec,
    build: StageBuild,
    a: Assembly,
    make_batches: Callable[[int], Iterator[dict]],
    runtime: Runtime,
) -> Stage:
    """The loop's stage of `spec`'s `build` (`a`: its assembly of the starting weights): the
    state created in its shardings, the frozen weights (LoRA's base) placed beside it, one
    step program over batch i of `make_batches(start)`."""
    section, batch_key = spec.section, spec.size_key

    def init():
        state, shardings = init_sharded_state(a.create, a.inputs, a.input_shardings, runtime.mesh)
        if a.frozen is None:
            return state, shardings
        # The frozen weights are the caller's own buffers, placed (not copied): one copy of a
        # LoRA base however many stages and states read it.
        placed = shard_tree(a.frozen, a.frozen_shardings)
        return state.replace(frozen=placed), shardings.replace(frozen=a.frozen_shardings)

    def program(shardings, start: int) -> StepFn:
        (p,) = build.programs(a, shardings.replace(frozen=None))
        compiled = CompiledOnce(p.jitted)
        batches = make_batches(start)

        def step(state, i, key):
            batch = runtime.global_batch(next(batches), batch_key)
            if a.frozen is None:
                state, metrics = compiled(state, batch, key)
            else:  # the old state is donated, its frozen weights are not
                new, metrics = compiled(state.replace(frozen=None), state.frozen, batch, key)
                state = new.replace(frozen=state.frozen)
            # XLA's account of the step's program: a per-device peak (weights, optimizer
            # state, activations), the same on every step.
            return state, {**metrics, "perf/peak_device_mib": compiled.peak_bytes() / 2**20}

        return step

    return Stage(
        build.name,
        section.steps,
        init,
        program,
        learned=lambda state: {"train": state},
        limits={"train": section.optim.max_consecutive_skips},
        log_every=spec.log_every,
    )
