"""The host loop shared by pretraining, SFT and RM training: jit once, feed batches, log."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax

from rlhf_jax.loops.guard import SkipGuard
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import batch_sharding, init_sharded_state, jit_step
from rlhf_jax.steps import TrainState

# Metrics shown in the progress bar when present.
BAR_KEYS = ("sft/loss", "rm/loss", "rm/accuracy", "objective/scores", "objective/kl")


def short_metrics(row: dict[str, float]) -> dict[str, str]:
    return {k.split("/", 1)[-1]: f"{v:.3g}" for k, v in row.items() if k in BAR_KEYS}


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
):
    """Run `n_steps` of `step_fn(state, batch, key)` on the runtime's mesh; returns the state.

    The state is created directly in its shardings (fresh buffers: the caller's `params`
    survive, e.g. SFT weights that also start the reward model), the step is jitted once with
    explicit shardings and the old state donated, step i gets `fold_in(key, i)` and batch i of
    `make_batches(start)`, and metrics reach the host only every `log_every` steps so the
    device never waits on it. With `checkpoints`, the stage resumes from its newest checkpoint
    and saves as configured. `batch_key` names the config key of the batch size in errors.
    Updates skipped for NaN/Inf gradients are logged; `max_consecutive_skips` of them in a row
    stop the stage with `TrainingDiverged` (nothing saved after them).
    """
    mesh = runtime.mesh
    state, shardings = init_sharded_state(
        lambda p: TrainState.create(p, tx), (params,), (param_shardings,), mesh
    )
    start = 0
    if checkpoints is not None:
        state, start = checkpoints.restore(state, shardings)
    try:  # from here on, an error still closes the checkpoints (no orbax thread left behind)
        jitted = jit_step(step_fn, shardings, batch_sharding(mesh, runtime.rules, 1))
        batches = make_batches(start)
        guard = SkipGuard(
            stage,
            {"train": max_consecutive_skips},
            logger,
            checkpoints.latest_step if checkpoints is not None else None,
        )
        pending = None  # (step, skip counters) of the previous step, read one step late
        with logger.bar(n_steps, stage) as bar:
            bar.update(start)
            for i in range(start, n_steps):
                batch = runtime.global_batch(next(batches), batch_key)
                state, metrics = jitted(state, batch, jax.random.fold_in(key, i))
                if pending is not None:
                    guard.check(*pending)
                pending = (i + 1, guard.counters(metrics))
                if (i + 1) % log_every == 0 or i + 1 == n_steps:
                    row = logger.log(stage, i + 1, metrics)
                    bar.set_postfix(short_metrics(row))
                bar.update(1)
                if checkpoints is not None:
                    if checkpoints.due(i + 1, n_steps):  # never save the step that stops us
                        guard.check(*pending)
                    checkpoints.after_step(i + 1, state, n_steps)
        if pending is not None:
            guard.check(*pending)
        guard.require_learning({"train": state})
    finally:
        if checkpoints is not None:
            checkpoints.close()  # commits a save in flight, also when a step raised
    return state
