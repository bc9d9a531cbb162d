"""Shardings of whatever the steps pass around, derived from the pytrees themselves.

Nothing here knows a state's layout (a supervised TrainState, an RL state with or without a
critic, a fork's own): every leaf that copies a parameter (the weights, Adam's moments, EMA
weights) is sharded like that parameter, found by key path and shape, and every other leaf
(counters, beta, scalars) is replicated. Inputs may be concrete or abstract (`jax.eval_shape`),
so shardings are known before anything is allocated.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh, NamedSharding

from rlhf_jax.sharding.rules import Rules, batch_sharding, shardings_from_params


def state_shardings(state: Any, mesh: Mesh, *param_groups: tuple[Any, Any]) -> Any:
    """A pytree of NamedShardings shaped like `state`, exactly what `jax.jit`'s in/out
    shardings take. `param_groups`: `(params_tree, shardings_tree)` pairs, e.g. the policy's
    weights and theirs, the critic's and theirs."""
    return shardings_from_params(state, [g for g in param_groups if g[0] is not None], mesh)


def experience_shardings(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every rollout / experience array, as one pytree prefix for `jit`: all are
    [B, ...], split over the batch axes like a data batch (a spec naming only the first
    dimension fits arrays of any rank), so the update reads each episode where it was made."""
    return batch_sharding(mesh, rules, ndim=1)
