"""One way to run a compiled function over every row of a dataset, for evaluation and scoring.

Without a runtime, or on one device, a function is plain `jax.jit` over host batches (the
programs one device always ran, unchanged to the bit). On a mesh it is compiled like the
training programs (`sharding.jit_eval`: under the activation rules, rows split over the batch
axes), each batch is fed as a global batch (each process its own rows) and the per-row
outputs are gathered back to every process.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import activation_sharding, data_parallel_size, jit_eval


def map_batches(
    fn: Callable[..., Any],
    arrays: Mapping[str, np.ndarray] | HeldRows,
    batch_size: int,
    with_offset: bool = False,
    runtime: Runtime | None = None,
) -> Any:
    """`fn(batch)` over consecutive slices of `batch_size` rows of `arrays`, outputs (a pytree
    of arrays whose leading axis is the batch's rows) concatenated for all N rows.

    The last slice is padded to `batch_size` by repeating its last row, so one compiled shape
    serves every call, and the padded rows' outputs are cut off: every row is evaluated once
    and none is dropped. With `with_offset`, `fn(batch, start)` also gets the index of the
    slice's first row (e.g. to fold it into a sampling key). With a mesh `runtime`, `fn`
    receives each batch as global arrays (`batch_size` rounded up to a multiple of the
    data-parallel size) and may return arrays split by rows: every process gets every row.
    `arrays` may hold only this process's rows (`HeldRows` of `process_rows.encode_ordered`,
    each row standing `repeat` times): the same global batches, each process feeding its
    slice.
    """
    on_mesh = on_a_mesh(runtime)
    if on_mesh:
        dp = data_parallel_size(runtime.mesh, runtime.rules)
        batch_size = -(-batch_size // dp) * dp
    if isinstance(arrays, HeldRows):
        return _map_held(fn, arrays, batch_size, with_offset, runtime)
    n = len(next(iter(arrays.values())))
    outs = []
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v[start : start + batch_size]) for k, v in arrays.items()}
        short = batch_size - min(batch_size, n - start)
        if short:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for k, v in batch.items()}
        if on_mesh:
            batch = runtime.global_batch(batch, None)
        out = fn(batch, start) if with_offset else fn(batch)
        outs.append(to_host(out) if on_mesh else jax.device_get(out))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *outs)


def _map_held(fn, held: HeldRows, batch_size: int, with_offset: bool, runtime: Runtime) -> Any:
    """`map_batches` over rows held by their processes: batch j's rows are the whole file's
    (each row `held.repeat` times) from j * batch_size on, the last repeated to fill it."""
    if batch_size != held.batch_size:
        raise ValueError(f"rows encoded for batches of {held.batch_size}, read in {batch_size}")
    total = held.n * held.repeat
    outs = []
    for start in range(0, total, batch_size):
        index = np.minimum(np.arange(start, start + batch_size), total - 1) // held.repeat
        batch = runtime.global_batch(held.global_batch(index), None)
        out = fn(batch, start) if with_offset else fn(batch)
        outs.append(to_host(out))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:total], *outs)


def map_params(
    fn: Callable[[Any, dict], Any],
    params: Any,
    arrays: Mapping[str, np.ndarray],
    keys: tuple[str, ...],
    batch_size: int,
    runtime: Runtime | None = None,
) -> Any:
    """`map_batches` of `fn(params, batch)` (not yet compiled: `compiled` compiles it for
    `runtime`) over the `keys` of `arrays` (only those travel to the device)."""
    run = compiled(fn, runtime)
    subset = {k: arrays[k] for k in keys}
    return map_batches(lambda b: run(params, b), subset, batch_size, runtime=runtime)


def on_a_mesh(runtime: Runtime | None) -> bool:
    """Whether evaluation runs as a sharded program (more than one device or process)."""
    return runtime is not None and not runtime.is_single_device


def to_host(tree: Any) -> Any:
    """Every row of each array of `tree` on this process's host (gathered from every process
    when the arrays span several)."""

    def one(x):
        if isinstance(x, np.ndarray) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def compiled(fn: Callable, runtime: Runtime | None) -> Callable:
    """`fn(params, batch)` compiled for `runtime`: plain `jax.jit` on one device, else
    `jit_eval` on its mesh under its activation rules (one compile per function and mesh)."""
    if not on_a_mesh(runtime):
        return _plain(fn)
    rules = runtime.activation_rules
    return _on_mesh(fn, runtime.mesh, _frozen(runtime.rules), _frozen(rules))


def activations_of(runtime: Runtime | None):
    """A context in which model code traced (e.g. by `generate`) constrains its activations
    by `runtime`'s rules; no constraints without a mesh."""
    if not on_a_mesh(runtime):
        return contextlib.nullcontext()
    return activation_sharding(runtime.mesh, runtime.activation_rules)


def _frozen(rules: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


@functools.lru_cache(maxsize=32)
def _plain(fn: Callable) -> Callable:
    return jax.jit(fn)


@functools.lru_cache(maxsize=32)
def _on_mesh(fn: Callable, mesh: jax.sharding.Mesh, rules: tuple, act_rules: tuple) -> Callable:
    return jit_eval(fn, mesh, dict(rules), dict(act_rules))
