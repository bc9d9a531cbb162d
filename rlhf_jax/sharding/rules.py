"""Logical axis names -> mesh axes, and the shardings of parameters and batches.

Every weight names its dimensions logically (`embed`, `heads`, `mlp`, ...; see
`models.param_logical_axes`); the `mesh.rules` config maps each name to a mesh axis, a list of
mesh axes, or null (replicated). Changing the parallelism of a run is therefore a config
change, never a model change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import RlhfJaxError

Rules = Mapping[str, Any]


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _names(entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry (None, a name, or a tuple of names) as a tuple of names."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _mesh_axes_of(logical: str, rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    if logical not in rules:
        raise RlhfJaxError(
            f"logical axis {logical!r} has no entry in config key 'mesh.rules' "
            f"(known: {', '.join(sorted(rules))})"
        )
    axes = _names(rules[logical])
    for axis in axes:
        if axis not in mesh.shape:
            raise RlhfJaxError(
                f"config key 'mesh.rules.{logical}': {axis!r} is not a mesh axis "
                f"(one of {', '.join(mesh.axis_names)}, a list of them, or null)"
            )
    return axes


def logical_to_mesh_spec(
    logical_spec: PartitionSpec | Sequence[Any],
    rules: Rules,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The mesh PartitionSpec of an array whose dimensions have logical names.

    Mesh axes of size 1 are dropped (they split nothing). A mesh axis is used at most once per
    array: a later dimension asking for an axis an earlier one took is replicated over it.
    With `shape`, a dimension its mesh axes do not divide evenly is replicated instead (e.g.
    2 KV heads on a 4-way `tensor` axis): correct everywhere, merely less memory-efficient.
    """
    used: set[str] = set()
    out = []
    for dim, entry in enumerate(logical_spec):
        axes: list[str] = []
        for logical in _names(entry):
            for axis in _mesh_axes_of(logical, rules, mesh):
                if mesh.shape[axis] > 1 and axis not in used and axis not in axes:
                    axes.append(axis)
        if shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
            axes = []
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, keys, metrics, counters)."""
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(logical_axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding of every weight from its logical axes and shape.

    logical_axes_tree: PartitionSpecs of logical names (`models.param_logical_axes`);
    shapes_tree: the same structure with anything that has `.shape` (arrays or
    `models.param_shapes`' ShapeDtypeStructs).
    """

    def one(spec: PartitionSpec, shaped: Any) -> NamedSharding:
        return NamedSharding(mesh, logical_to_mesh_spec(spec, rules, mesh, shaped.shape))

    return jax.tree.map(one, logical_axes_tree, shapes_tree, is_leaf=_is_spec)


def model_param_shardings(model_config: Any, mesh: Mesh, rules: Rules, scalar: bool = False):
    """`param_shardings` of a decoder (or, with `scalar=True`, a reward/value model
    `{"trunk", "head"}`), computed from the config alone: nothing is allocated."""
    from rlhf_jax.models import (
        param_logical_axes,
        param_shapes,
        scalar_model_logical_axes,
        scalar_trunk,
    )

    if not scalar:
        return param_shardings(
            param_logical_axes(model_config), param_shapes(model_config), mesh, rules
        )
    head = jax.ShapeDtypeStruct((model_config.d_model,), model_config.weight_dtype)
    shapes = {
        "trunk": scalar_trunk(param_shapes(model_config)),
        "head": {"kernel": head, "bias": jax.ShapeDtypeStruct((), head.dtype)},
    }
    return param_shardings(scalar_model_logical_axes(model_config), shapes, mesh, rules)


def _path_key(entry: Any) -> Any:
    """A key-path entry as a plain value, so dict keys, attributes and indices compare."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def tree_shardings_like(tree: Any, params_tree: Any, param_shardings_tree: Any, mesh: Mesh):
    """Shardings for any pytree that holds copies of the parameters, e.g. optax state.

    A leaf whose key path ends with a parameter's key path and has that parameter's shape
    gets the parameter's sharding (Adam's mu and nu, accumulated gradients, EMA weights);
    every other leaf (step counters, scalars) is replicated. `tree` and `params_tree` may
    hold arrays or ShapeDtypeStructs.
    """
    return shardings_from_params(tree, [(params_tree, param_shardings_tree)], mesh)


def shardings_from_params(tree: Any, groups: Sequence[tuple[Any, Any]], mesh: Mesh) -> Any:
    """`tree_shardings_like` over several `(params_tree, shardings_tree)` groups at once (a
    policy and a critic, say): each leaf takes the sharding of the parameter whose key path
    is the longest suffix of its own and whose shape it has; the rest are replicated."""
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
    for params_tree, param_shardings_tree in groups:
        flat_params = jax.tree_util.tree_leaves_with_path(params_tree)
        flat_shardings = jax.tree.leaves(param_shardings_tree)
        if len(flat_params) != len(flat_shardings):
            raise ValueError("params_tree and param_shardings_tree have different structures")
        for (path, leaf), sharding in zip(flat_params, flat_shardings):
            by_path[tuple(map(_path_key, path))] = (tuple(leaf.shape), sharding)
    longest = max((len(p) for p in by_path), default=0)

    def one(path, leaf):
        keys = tuple(map(_path_key, path))
        for n in range(min(longest, len(keys)), 0, -1):
            match = by_path.get(keys[-n:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (the rules' `batch` entry, sizes > 1)."""
    return tuple(a for a in _mesh_axes_of("batch", rules, mesh) if mesh.shape[a] > 1)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """Number of shards of the batch dimension: global batch sizes must be multiples of it."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Dimension `batch_axis` of an `ndim`-array split over the batch axes, the rest
    replicated. A scalar (ndim 0) is replicated."""
    if ndim == 0:
        return replicated(mesh)
    logical: list[str | None] = [None] * ndim
    logical[batch_axis] = "batch"
    return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh))


def batch_shardings_like(tree: Any, mesh: Mesh, rules: Rules, batch_axis: int = 0) -> Any:
    """`batch_sharding` for every array of a batch pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, x.ndim, batch_axis), tree)
