"""Evaluating every row of a dataset whose rows are split over processes (`HeldRows`).

Each row is owned by one process (`HeldRows.owner`: the process that reads it first, or for a
row no batch reads, the one `encode_own_rows(..., every_row=True)` gave it). Each process
feeds its owned rows as its slice of global batches, so the program is the training
programs' kind (rows split over the batch axes, every process taking part in every batch),
keeps its rows' per-row outputs, and the per-row outputs (and the row's small arrays: ranks,
masks, counts) are then gathered, so every process holds them for all N rows in the file's
order, as one process would have computed them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from rlhf_jax import processes
from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops.batched import compiled, map_params
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import (
    data_parallel_size,
    host_local_rows,
    local_batch_rows,
    make_global_batch,
)


def every_row(
    fn: Callable,
    params: Any,
    arrays: Mapping[str, np.ndarray] | HeldRows,
    keys: tuple[str, ...],
    batch_size: int,
    runtime: Runtime | None,
) -> tuple[Any, Mapping[str, np.ndarray]]:
    """`(outputs, small)`: `fn(params, batch)`'s per-row outputs for every row, and the
    arrays with less per row than the largest of the inputs `keys` (what a metric reads
    beside the outputs) for every row; `arrays` itself when every row is held here."""
    if not isinstance(arrays, HeldRows):
        return map_params(fn, params, arrays, keys, batch_size, runtime), arrays
    own = np.flatnonzero(arrays.owner)
    outputs = _owned_outputs(fn, params, arrays, own, keys, batch_size, runtime)
    # "small": less per row than the largest input (the token arrays), e.g. ranks and masks
    per_row = max(np.prod(arrays.arrays[k].shape[1:]) for k in keys)
    small = {k: v[own] for k, v in arrays.arrays.items() if np.prod(v.shape[1:]) < per_row}
    gathered = gather_rows(arrays.rows[own], {"out": outputs, "small": small}, arrays.n)
    return gathered["out"], gathered["small"]


def _owned_outputs(fn, params, held: HeldRows, own, keys, batch_size, runtime: Runtime):
    """`fn`'s outputs for the held rows `own`, in batches whose slice here is those rows (the
    last padded by repeating a row; every process runs as many batches as the one owning
    the most rows)."""
    mesh, rules = runtime.mesh, runtime.rules
    dp = data_parallel_size(mesh, rules)  # rounded up as `map_batches` rounds it
    batch_size = -(-batch_size // dp) * dp
    local = local_batch_rows(batch_size, mesh, rules)
    size = local.stop - local.start
    counts = processes.gather(np.int64(len(own)), "owned row counts")
    run = compiled(fn, runtime)
    pad = own[-1:] if len(own) else np.zeros(1, np.int64)
    outs = []
    for j in range(max(1, -(-int(np.max(counts)) // size))):
        idx = own[j * size : (j + 1) * size]
        idx = np.concatenate([idx, np.repeat(pad, size - len(idx))])
        batch = make_global_batch({k: held.arrays[k][idx] for k in keys}, mesh, rules)
        outs.append(jax.tree.map(lambda x: host_local_rows(x)[1], run(params, batch)))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[: len(own)], *outs)


def gather_rows(rows: np.ndarray, tree: Any, n: int) -> Any:
    """Every process's `tree` (arrays with one entry per row of `rows`, which differ between
    processes) put together on every process as arrays of `n` rows in row order."""
    counts = processes.gather(np.int64(len(rows)), "gathered row counts")
    most = int(np.max(counts))
    padded_rows = np.full(most, -1, np.int64)
    padded_rows[: len(rows)] = rows

    def pad(x):
        x = np.asarray(x)
        out = np.zeros((most, *x.shape[1:]), x.dtype)
        out[: len(x)] = x
        return out

    everyone = processes.gather(
        {"rows": padded_rows, "tree": jax.tree.map(pad, tree)}, "gathered rows"
    )
    where = everyone["rows"].reshape(-1)
    real = where >= 0

    def place(x):
        flat = x.reshape(-1, *x.shape[2:])
        full = np.zeros((n, *x.shape[2:]), x.dtype)
        full[where[real]] = flat[real]
        return full

    return jax.tree.map(place, everyone["tree"])
