"""Encoding only this process's rows of a file (see data/shard.py for the assignment).

One process encodes every row, as always. With several processes and `data.on_error=raise`
(the default) each encodes only the rows its slice of the run's batches reads, and the
encoders' counts (truncated texts) are summed over processes, each counting the rows it is
the first to read, so summary.json counts every row the run reads exactly once. Under
`data.on_error=skip` an encoder may drop a row (a prompt too long), which changes the row
count and so every process's shuffle: there every process still encodes every row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.config import Config
from rlhf_jax.data import DataReport
from rlhf_jax.data.shard import HeldRows, rows_used, select
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import local_batch_rows

Encode = Callable[[Sequence, DataReport | None], dict[str, np.ndarray]]


def splits_rows(cfg: Config) -> bool:
    """Whether this run's processes each encode only their own rows."""
    # Rollout filters draw fresh prompts from the whole file for their extra rounds.
    filtered = bool(cfg.ppo.rollout_filters)
    return jax.process_count() > 1 and cfg.data.on_error == "raise" and not filtered


def encode_own_rows(
    examples: Sequence,
    encode: Encode,
    report: DataReport,
    batches: tuple[int, int, int, str],
    runtime: Runtime,
) -> HeldRows:
    """`encode(examples, report)` of the rows this process's batches read, as `HeldRows`.
    batches: (global batch size, batches the run takes, the batches' seed, the batch size's
    config key)."""
    batch_size, n_batches, seed, key_name = batches
    local = local_batch_rows(batch_size, runtime.mesh, runtime.rules, key_name)
    rows, first = rows_used(len(examples), batch_size, seed, n_batches, local)
    # The rows this process reads first are encoded with the file's report (their truncations
    # counted), the others without (counted by the process that reads them first).
    mine = select(examples, rows)
    counted = [e for e, f in zip(mine, first) if f]
    others = [e for e, f in zip(mine, first) if not f]
    truncated = report.truncated
    parts = ((counted, report), (others, None))
    encoded = [encode(part, counts) for part, counts in parts if part]
    arrays = {k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}
    order = np.argsort(np.concatenate([rows[first], rows[~first]]), kind="stable")
    arrays = {k: v[order] for k, v in arrays.items()}
    own = np.asarray(report.truncated - truncated, np.int64)
    report.truncated = truncated + int(multihost_utils.process_allgather(own).sum())
    print(
        f"{report.path}: process {jax.process_index()} of {jax.process_count()} encoded "
        f"{len(rows)} of {len(examples)} rows (those its slice of the batches reads)",
        flush=True,
    )
    return HeldRows(arrays, rows, len(examples), batch_size, local)
