"""The activations' side of the rules: how `models.axes.constrain` names become shardings.

Activations read the same `mesh.rules` table as the weights, overridden by
`mesh.activation_rules` where the two must differ. By default only `embed` does: a weight's
model dimension is split over `fsdp` (ZeRO-3), but an activation's is not, its batch is
(`batch: [data, fsdp]`); so on an FSDP mesh each layer all-gathers its weights and every
activation stays split by rows. `heads`, `kv_heads`, `mlp` and `vocab` follow the weights
(tensor parallelism splits the heads, the MLP's hidden layer and the logits' vocabulary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jax.sharding import Mesh, NamedSharding

from rlhf_jax.models.axes import activation_resolver
from rlhf_jax.sharding.rules import Rules, logical_to_mesh_spec

# mesh.activation_rules' defaults: where an activation's dimension is split unlike the
# weight dimension of the same name.
DEFAULT_ACTIVATION_RULES: dict[str, Any] = {"embed": None, "length": None}


def activation_rules(rules: Rules, overrides: Mapping[str, Any] | None = None) -> dict:
    """The table activations are constrained by: `rules` (the weights'), then the defaults
    above, then `overrides` (config `mesh.activation_rules`)."""
    return {**rules, **DEFAULT_ACTIVATION_RULES, **(overrides or {})}


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Model code traced inside this block constrains its activations by `rules` (a full
    table, e.g. from `activation_rules`) on `mesh`. On a one-device mesh nothing is
    constrained: the traced program is exactly the unconstrained one."""
    resolver = None if mesh.size == 1 else _Resolver(mesh, _frozen(rules))
    with activation_resolver(resolver):
        yield


def _frozen(rules: Rules) -> tuple:
    """`rules` as a hashable, ordered tuple of (name, mesh axes)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


@dataclasses.dataclass(frozen=True)
class _Resolver:
    """Logical names -> NamedSharding on `mesh`; hashable, so a jitted function can take it
    as a static argument (`models.axes.active_resolver`)."""

    mesh: Mesh
    rules: tuple

    def __call__(self, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        # `shape`: a dimension its mesh axes do not divide is left whole, as for weights.
        spec = logical_to_mesh_spec(axes, dict(self.rules), self.mesh, shape)
        return NamedSharding(self.mesh, spec)


def with_activation_sharding(fn: Callable, mesh: Mesh, rules: Rules | None) -> Callable:
    """`fn` whose tracing happens inside `activation_sharding(mesh, rules)`: what `jax.jit`
    should be given. `rules` None: `fn` unchanged (no constraints)."""
    if rules is None:
        return fn

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return traced
