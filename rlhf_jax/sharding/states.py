"""Shardings of the training states, frozen weights and rollouts that the steps pass around.

Each function returns a pytree of the same structure as its input with a NamedSharding per
array: exactly what `jax.jit`'s in/out shardings take. Inputs may be concrete states or
abstract ones (`jax.eval_shape`), so shardings can be known before anything is allocated.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh, NamedSharding

from rlhf_jax.sharding.rules import (
    Rules,
    batch_sharding,
    replicated,
    tree_shardings_like,
)
from rlhf_jax.steps import Frozen, PPOState, TrainState


def state_shardings(state: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """A TrainState of shardings: params as given, optimizer moments like their params,
    step and optimizer counters replicated."""
    return state.replace(
        step=replicated(mesh),
        params=param_shardings,
        opt_state=tree_shardings_like(state.opt_state, state.params, param_shardings, mesh),
    )


def ppo_state_shardings(
    state: PPOState, policy_shardings: Any, value_shardings: Any, mesh: Mesh
) -> PPOState:
    """A PPOState of shardings: both TrainStates, EMA weights like the policy's (or None
    when EMA is off), beta and the iteration counter replicated."""
    return state.replace(
        policy=state_shardings(state.policy, policy_shardings, mesh),
        value=state_shardings(state.value, value_shardings, mesh),
        beta=replicated(mesh),
        ema_params=None if state.ema_params is None else policy_shardings,
        iteration=replicated(mesh),
    )


def frozen_shardings(policy_shardings: Any, reward_shardings: Any) -> Frozen:
    """The reference policy is sharded like the policy, the reward model like its params."""
    return Frozen(ref=policy_shardings, reward=reward_shardings)


def experience_shardings(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every `Experience` array, as one pytree prefix for `jit`: all are
    [B, ...], split over the batch axes like a data batch (a spec naming only the first
    dimension fits arrays of any rank), so the update reads each episode where it was made."""
    return batch_sharding(mesh, rules, ndim=1)
