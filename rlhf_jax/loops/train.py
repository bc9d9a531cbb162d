"""The host loop shared by pretraining, SFT and RM training: jit once, feed batches, log."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax

from rlhf_jax.loops.logging import MetricsLogger

# Metrics shown in the progress bar when present.
BAR_KEYS = ("sft/loss", "rm/loss", "rm/accuracy", "objective/scores", "objective/kl")


def short_metrics(row: dict[str, float]) -> dict[str, str]:
    return {k.split("/", 1)[-1]: f"{v:.3g}" for k, v in row.items() if k in BAR_KEYS}


def run_train_loop(
    step_fn: Callable,
    state,
    batches: Iterator[dict],
    n_steps: int,
    key: jax.Array,
    logger: MetricsLogger,
    stage: str,
    log_every: int,
):
    """Run `n_steps` of `step_fn(state, batch, key)`, jitted once with the old state donated.

    Each step gets its own key, `fold_in(key, step)`; metrics reach the host only every
    `log_every` steps so the device is never waiting on the host in between.
    """
    jitted = jax.jit(step_fn, donate_argnums=(0,))
    # Donation frees the state's buffers; the caller's arrays (e.g. SFT weights that also
    # start the reward model) must survive, so the loop works on its own copy.
    state = jax.tree.map(lambda x: jax.device_put(x, may_alias=False), state)
    with logger.bar(n_steps, stage) as bar:
        for i in range(n_steps):
            state, metrics = jitted(state, next(batches), jax.random.fold_in(key, i))
            if (i + 1) % log_every == 0 or i + 1 == n_steps:
                row = logger.log(stage, i + 1, metrics)
                bar.set_postfix(short_metrics(row))
            bar.update(1)
    return state
