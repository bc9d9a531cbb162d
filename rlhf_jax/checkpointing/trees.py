"""State pytrees <-> nested dicts of arrays named by the leaves' pytree paths (what orbax
stores), and restore targets (`jax.ShapeDtypeStruct`s with shardings)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

Names = tuple[str, ...]


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(tree) -> tuple[list[tuple[Names, Any]], Any]:
    """`([(names, leaf)], treedef)`: names from the path's attributes, dict keys, indices
    (e.g. `("opt_state", "inner_state", "1", "0", "mu", "embed")`)."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(tuple(_key_name(k) for k in path), leaf) for path, leaf in pairs]
    seen: set[Names] = set()
    for names, leaf in named:
        if names in seen:
            raise ValueError(f"two state leaves share the name {'/'.join(names)!r}")
        seen.add(names)
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"state leaf {'/'.join(names)} is a typed PRNG key: keep keys out of the state "
                "(put `key_to_json(key)` or the seed in the checkpoint's meta)"
            )
    return named, treedef


def nest(named: Iterable[tuple[Names, Any]]) -> dict:
    out: dict = {}
    for names, value in named:
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value
    return out


def flat(nested, prefix: Names = ()) -> dict[Names, Any]:
    if not isinstance(nested, dict):
        return {prefix: nested}
    out = {}
    for k, v in nested.items():
        out.update(flat(v, (*prefix, str(k))))
    return out


def _abstract(x, sharding) -> jax.ShapeDtypeStruct:
    shape = x.shape if hasattr(x, "shape") else np.shape(x)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    sharding = sharding or getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_state(tree, shardings=None):
    """The restore target for `tree`: a pytree of `jax.ShapeDtypeStruct` with shardings.

    tree: arrays, or ShapeDtypeStructs (e.g. `jax.eval_shape(make_state)`, which keeps static
        fields such as a TrainState's `tx`). shardings: a pytree of Shardings matching `tree`
        (a prefix of it is fine), or one Sharding for every leaf; by default each leaf's own
        sharding, else the first local device.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        per_leaf = [shardings] * len(leaves)
    else:
        per_leaf = jax.tree.leaves(
            jax.tree.map(lambda s, sub: [s] * len(jax.tree.leaves(sub)), shardings, tree)
        )
    return jax.tree.unflatten(treedef, [_abstract(x, s) for x, s in zip(leaves, per_leaf)])
