"""Putting weights, optimizer states and batches onto the mesh.

Nothing here ever materialises a whole sharded state on one device: weights are placed
slice by slice (`device_put` with a NamedSharding), and optimizer states are created inside a
`jit` whose out_shardings put each moment straight into its shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.sharding.rules import Rules, batch_axes, batch_sharding, data_parallel_size
from rlhf_jax.sharding.states import state_shardings


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place every array of `tree` by its sharding (a matching pytree, or a prefix).

    Host (NumPy) inputs must hold the full global value in every process; each device then
    receives only its slice. Arrays already placed that way are returned as they are.
    """
    return jax.device_put(tree, shardings)


def init_sharded(init_fn: Callable[..., Any], out_shardings: Any, *args: Any) -> Any:
    """`init_fn(*args)` computed directly into `out_shardings`, e.g. random weights:
    `init_sharded(functools.partial(init_params, config), shardings, key)`."""
    return jax.jit(init_fn, out_shardings=out_shardings)(*args)


def init_sharded_state(
    create: Callable[..., Any],
    inputs: tuple[Any, ...],
    input_shardings: tuple[Any, ...],
    mesh: Mesh,
    donate: bool = False,
) -> tuple[Any, Any]:
    """`create(*inputs)` computed straight into its shards: `(state, state_shardings)`.

    `inputs` are parameter trees (or None), placed by `input_shardings` first; every leaf of
    the state that copies one of their leaves (the weights, optimizer moments, EMA weights) is
    born sharded like it, the rest replicated (`state_shardings`). The outputs are fresh
    buffers, so the inputs stay valid (e.g. SFT weights that are also PPO's frozen reference),
    unless `donate=True` frees them (big models whose weights have no other use).
    """
    inputs = tuple(shard_tree(x, s) for x, s in zip(inputs, input_shardings))
    abstract = jax.eval_shape(create, *inputs)
    shardings = state_shardings(abstract, mesh, *zip(inputs, input_shardings))
    donate_argnums = tuple(i for i, x in enumerate(inputs) if x is not None) if donate else ()
    state = jax.jit(create, out_shardings=shardings, donate_argnums=donate_argnums)(*inputs)
    return state, shardings


def check_batch_divisible(
    global_batch_size: int, mesh: Mesh, rules: Rules, key_name: str | None = None
) -> None:
    """RlhfJaxError unless the global batch splits evenly over the data-parallel shards."""
    dp = data_parallel_size(mesh, rules)
    if global_batch_size % dp == 0:
        return
    axes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in batch_axes(mesh, rules))
    what = f"config key '{key_name}'" if key_name else "batch size"
    raise RlhfJaxError(
        f"{what}: the global batch of {global_batch_size} does not divide into the {dp} "
        f"data-parallel shards ({axes}); use a multiple of {dp}"
    )


def _local_rows(size: int, mesh: Mesh, rules: Rules) -> list[tuple[int, int]]:
    """Distinct [start, stop) row ranges of a batch of `size` held by this process."""
    index_map = batch_sharding(mesh, rules, 1).addressable_devices_indices_map((size,))
    return sorted({idx[0].indices(size)[:2] for idx in index_map.values()})


def local_batch_rows(global_batch_size: int, mesh: Mesh, rules: Rules, key_name=None) -> slice:
    """The rows of a global batch this process must load and pass to `make_global_batch`
    (all of them in a single-process run)."""
    check_batch_divisible(global_batch_size, mesh, rules, key_name)
    rows = _local_rows(global_batch_size, mesh, rules)
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError("this process's batch rows are not contiguous: build meshes by make_mesh")
    return slice(start, stop)


def host_local_rows(x: Any) -> tuple[slice, np.ndarray]:
    """`(rows, values)`: the contiguous rows of a global array split along its first axis that
    this process's devices hold, copied to the host (the inverse of `make_global_batch`).
    Replicas of a row range (e.g. across a tensor axis) are copied once; a NumPy array or a
    fully addressable array is all rows."""
    if isinstance(x, np.ndarray) or x.is_fully_addressable:
        values = np.asarray(x)
        return slice(0, values.shape[0]), values
    n = x.shape[0]
    shards = {}
    for shard in x.addressable_shards:
        shards.setdefault(shard.index[0].indices(n)[:2], shard)
    ranges = sorted(shards)
    if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(
            f"this process's rows {ranges} are not contiguous: build meshes by make_mesh"
        )
    values = np.concatenate([np.asarray(shards[r].data) for r in ranges])
    return slice(ranges[0][0], ranges[-1][1]), values


def make_global_batch(
    local_batch: Any,
    mesh: Mesh,
    rules: Rules,
    key_name: str | None = None,
    batch_axis: int = 0,
) -> Any:
    """One global jax.Array per array of `local_batch` (a dict or any pytree of NumPy arrays,
    each process passing its own rows, see `local_batch_rows`), split along `batch_axis`
    over the batch mesh axes. Single-process runs pass the whole batch.

    The global batch (local rows x processes along the batch axes) must divide by the
    data-parallel size; otherwise RlhfJaxError names `key_name`, the config key that sets it.
    """
    dp = data_parallel_size(mesh, rules)
    groups = dp // len(_local_rows(dp, mesh, rules))  # processes holding different rows

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, 0), x)
        shape = list(x.shape)
        shape[batch_axis] *= groups
        check_batch_divisible(shape[batch_axis], mesh, rules, key_name)
        sharding = batch_sharding(mesh, rules, x.ndim, batch_axis)
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(one, local_batch)
