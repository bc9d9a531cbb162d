"""Resumable training checkpoints: a thin layer over orbax's `CheckpointManager`.

Each step folder `<directory>/<step>/` holds two items, written together and committed
atomically (orbax writes `<step>.orbax-checkpoint-tmp*` and renames it once complete, so a
process killed mid-save leaves the earlier checkpoints intact and restorable; the leftover
temporary folder is removed the next time a writable `Checkpointer` opens the folder):

  state/  every array leaf of the state pytree (params, optimizer moments, step counters, beta,
          EMA weights...), as a nested dict named by the leaves' pytree paths. Static fields
          (a `TrainState`'s `tx`) and empty nodes (`None`, `optax.EmptyState`) are not stored:
          `restore` rebuilds the state in the structure of the caller's `target`.
  meta/   a JSON dict from the caller: seed or key data, data position, stage, config
          fingerprint... (tuples come back as lists).

Multi-process runs: every process calls `save`, `restore`, `wait` and `close` at the same
steps. Each process writes the shards of its own devices; orbax lets only the primary
process (0) write the JSON and metadata files, commit the step folder and delete old steps,
with barriers in between. `restore` reads each shard straight onto the devices of the
target's shardings, so a checkpoint saved on one mesh restores onto any other.
"""

from rlhf_jax.checkpointing.manager import Checkpointer
from rlhf_jax.checkpointing.meta import fingerprint, key_from_json, key_to_json
from rlhf_jax.checkpointing.preemption import (
    clear_preemption,
    install_preemption_handler,
    preemption_requested,
)
from rlhf_jax.checkpointing.trees import abstract_state

__all__ = [
    "Checkpointer",
    "abstract_state",
    "clear_preemption",
    "fingerprint",
    "install_preemption_handler",
    "key_from_json",
    "key_to_json",
    "preemption_requested",
]
