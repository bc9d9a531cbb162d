"""The one host loop every stage runs on (pretraining, SFT, the reward model, DPO and RL),
driven by a small description of the stage (`Stage`).

The loop owns what every stage needs and none should write again: the state created in its
shardings, resume from the newest checkpoint, one program call per step with the step's key,
the NaN/Inf skip guard, logging and the progress bar, saving (and SIGTERM, through the
checkpoints), and the end-of-stage check that something was learned. A stage says only how to
build its state, how to take one step, and which optimizers to watch.

Adding a stage takes a step function, a `Stage` and a row in the CLI's table of commands
(`supervised_stage` already covers any `step(state, batch, key)` over a dataset).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

from rlhf_jax.data import batches
from rlhf_jax.loops.guard import SkipGuard
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import batch_sharding, init_sharded_state, jit_step, shard_tree
from rlhf_jax.steps import TrainState, make_optimizer

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


def supervised_stage(
    name: str,
    step_fn: Callable,
    params,
    tx,
    make_batches: Callable[[int], Iterator[dict]],
    n_steps: int,
    runtime: Runtime,
    param_shardings,
    batch_key: str,
    log_every: int,
    max_consecutive_skips: int = 10,
    frozen=None,
    frozen_shardings=None,
) -> Stage:
    """A stage of `step_fn(state, batch, key) -> (state, metrics)` over a `TrainState` of
    `params` (fresh buffers: the caller's `params` survive, e.g. SFT weights that also start
    the reward model) with batch i of `make_batches(start)`, jitted once with explicit
    shardings and the old state donated. `batch_key` names the batch size's config key in
    errors. `frozen`: weights the model reads but does not train (LoRA's base)."""
    mesh = runtime.mesh

    def init():
        state, shardings = init_sharded_state(
            lambda p: TrainState.create(p, tx), (params,), (param_shardings,), mesh
        )
        if frozen is None:
            return state, shardings
        # The frozen weights are the caller's own buffers, placed (not copied): one copy of a
        # LoRA base however many stages and states read it.
        placed = shard_tree(frozen, frozen_shardings)
        return state.replace(frozen=placed), shardings.replace(frozen=frozen_shardings)

    def program(shardings, start: int) -> StepFn:
        rows = batch_sharding(mesh, runtime.rules, 1)
        if frozen is None:
            compiled = CompiledOnce(
                jit_step(step_fn, shardings, rows, activation_rules=runtime.activation_rules)
            )
        else:
            compiled = CompiledOnce(
                jit_step(
                    frozen_apart(step_fn),
                    shardings.replace(frozen=None),
                    rows,
                    frozen_shardings=shardings.frozen,
                    activation_rules=runtime.activation_rules,
                )
            )
        batches = make_batches(start)

        def step(state, i, key):
            batch = runtime.global_batch(next(batches), batch_key)
            if frozen is None:
                state, metrics = compiled(state, batch, key)
            else:  # the old state is donated, its frozen weights are not
                new, metrics = compiled(state.replace(frozen=None), state.frozen, batch, key)
                state = new.replace(frozen=state.frozen)
            # XLA's account of the step's program: a per-device peak (weights, optimizer
            # state, activations), the same on every step.
            return state, {**metrics, "perf/peak_device_mib": compiled.peak_bytes() / 2**20}

        return step

    return Stage(
        name,
        n_steps,
        init,
        program,
        learned=lambda state: {"train": state},
        limits={"train": max_consecutive_skips},
        log_every=log_every,
    )


def frozen_apart(step_fn: Callable) -> Callable:
    """`step(state, batch, key)` as `step(state, frozen, batch, key)` over a state without
    its frozen weights: what `jit_step(..., frozen_shardings=...)` compiles."""

    def step(state, frozen, batch, key):
        new, metrics = step_fn(state.replace(frozen=frozen), batch, key)
        return new.replace(frozen=None), metrics

    return step


def run_train_loop(
    step_fn: Callable,
    params,
    tx,
    make_batches: Callable[[int], Iterator[dict]],
    n_steps: int,
    key: jax.Array,
    logger: MetricsLogger,
    stage: str,
    log_every: int,
    runtime: Runtime,
    param_shardings,
    batch_key: str,
    checkpoints: StageCheckpoints | None = None,
    max_consecutive_skips: int = 10,
    frozen=None,
    frozen_shardings=None,
):
    """`run_stage` of a `supervised_stage`: pretraining, SFT, the reward model, DPO."""
    spec = supervised_stage(
        stage,
        step_fn,
        params,
        tx,
        make_batches,
        n_steps,
        runtime,
        param_shardings,
        batch_key,
        log_every,
        max_consecutive_skips,
        frozen,
        frozen_shardings,
    )
    return run_stage(spec, key, logger, checkpoints)


def train_section(
    stage: str,
    section: Any,
    step_fn: Callable,
    params,
    arrays: dict,
    data_seed: int,
    key: jax.Array,
    logger: MetricsLogger,
    runtime: Runtime,
    param_shardings,
    log_every: int,
    checkpoints: StageCheckpoints | None = None,
    batch_key: str | None = None,
    frozen=None,
    frozen_shardings=None,
):
    """`run_train_loop` for a config section with `steps`, `batch_size` and `optim` (pretrain,
    sft, rm, dpo): Adam from `section.optim`, shuffled batches of `arrays` seeded by
    `data_seed`. `batch_key` (default `<stage>.batch_size`) names the batch size in errors.
    `frozen`: weights read but not trained (LoRA's base); the returned state's
    `model_params` joins them with the trained ones."""
    return run_train_loop(
        step_fn,
        params,
        make_optimizer(section.optim, section.steps),
        lambda start: batches(arrays, section.batch_size, data_seed, start=start),
        section.steps,
        key,
        logger,
        stage,
        log_every,
        runtime,
        param_shardings,
        batch_key or f"{stage}.batch_size",
        checkpoints,
        section.optim.max_consecutive_skips,
        frozen,
        frozen_shardings,
    )
