"""Compiling the pure steps for the mesh: explicit in/out shardings and a donated state.

Explicit shardings at the jit boundary fix the weights', batches' and outputs' layouts; inside,
the model constrains its activations by logical names (`models.axes.constrain`), which these
wrappers resolve while tracing with the activation rules (`activations.py`). Both are needed:
from the boundary alone the partitioner (Auto mesh axes) may contract over an FSDP-split model
dimension and all-gather the global batch's logits onto every device; with the activations
pinned to their rows it all-gathers each layer's weights instead, reduce-scatters their
gradients and all-reduces tensor-parallel layers. The old state is donated, so a step updates
the weights in place instead of holding two copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from rlhf_jax.sharding.activations import activation_rules as _activation_rules
from rlhf_jax.sharding.activations import with_activation_sharding
from rlhf_jax.sharding.rules import Rules, batch_sharding, replicated
from rlhf_jax.sharding.states import experience_shardings


def _mesh_of(shardings: Any) -> Mesh:
    for leaf in jax.tree.leaves(shardings):
        if isinstance(leaf, NamedSharding):
            return leaf.mesh
    raise ValueError("no NamedSharding among the state shardings; pass mesh=")


def _traced(fn: Callable, mesh: Mesh, rules: Rules, activation_rules: Rules | None) -> Callable:
    """`fn` traced under the activation rules: given ones, or the defaults over `rules`."""
    table = _activation_rules(rules) if activation_rules is None else activation_rules
    return with_activation_sharding(fn, mesh, table)


def jit_step(
    step_fn: Callable,
    state_shardings: Any,
    batch_shardings: Any,
    donate: bool = True,
    mesh: Mesh | None = None,
    frozen_shardings: Any = None,
    activation_rules: Rules | None = None,
) -> Callable:
    """Jit `step(state, batch, key) -> (state, metrics)` (SFT, RM, or any step of that form),
    or with `frozen_shardings` `step(state, frozen, batch, key)`: weights the step reads but
    never changes (LoRA's base) as their own argument, never donated, so they stay the
    caller's buffers instead of being copied into each new state.

    batch_shardings: a pytree matching the batch, or one sharding as a prefix for all of it
    (`batch_sharding(mesh, rules, 1)` splits the first dimension of arrays of any rank).
    Metrics come back replicated (one sharding serves as the prefix of the whole dict, whose
    keys are only known after tracing). With `donate`, the input state must not be reused.
    `activation_rules`: the full table the model's activations are constrained by
    (`Runtime.activation_rules`); None constrains none (a step of no model, or a test of
    the unconstrained program).
    """
    mesh = mesh or _mesh_of(state_shardings)
    rep = replicated(mesh)
    frozen = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(
        with_activation_sharding(step_fn, mesh, activation_rules),
        in_shardings=(state_shardings, *frozen, batch_shardings, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,) if donate else (),
    )


def jit_experience(
    experience_fn: Callable,
    state_shardings: Any,
    frozen_shardings: Any,
    mesh: Mesh,
    rules: Rules,
    activation_rules: Rules | None = None,
) -> Callable:
    """Jit RL's `experience(state, frozen, prompt_ids, prompt_mask, key)`: prompts split over
    the batch axes, the Experience returned split the same way, metrics replicated. Nothing is
    donated: the update needs the state next. `activation_rules` here and below: as
    `jit_step`'s, None meaning the defaults over `rules`."""
    rows = batch_sharding(mesh, rules, 1)
    rep = replicated(mesh)
    return jax.jit(
        _traced(experience_fn, mesh, rules, activation_rules),
        in_shardings=(state_shardings, frozen_shardings, rows, rows, rep),
        out_shardings=(experience_shardings(mesh, rules), rep),
    )


def jit_sample(
    sample_fn: Callable,
    policy_shardings: Any,
    mesh: Mesh,
    rules: Rules,
    activation_rules: Rules | None = None,
) -> Callable:
    """Jit `sample(policy_params, prompt_ids, prompt_mask, key) -> Rollout`, rows split over
    the batch axes (used when a reward function scores the rollout on the host)."""
    rows = batch_sharding(mesh, rules, 1)
    return jax.jit(
        _traced(sample_fn, mesh, rules, activation_rules),
        in_shardings=(policy_shardings, rows, rows, replicated(mesh)),
        out_shardings=rows,
    )


def jit_finish(
    finish_fn: Callable,
    state_shardings: Any,
    frozen_shardings: Any,
    mesh: Mesh,
    rules: Rules,
    activation_rules: Rules | None = None,
) -> Callable:
    """Jit `finish(state, frozen, rollout, scores) -> (Experience, metrics)`: the rollout and
    the host's scores split over the batch axes like the experience."""
    rows = batch_sharding(mesh, rules, 1)
    return jax.jit(
        _traced(finish_fn, mesh, rules, activation_rules),
        in_shardings=(state_shardings, frozen_shardings, rows, rows),
        out_shardings=(experience_shardings(mesh, rules), replicated(mesh)),
    )


def jit_update(
    update_fn: Callable,
    state_shardings: Any,
    mesh: Mesh,
    rules: Rules,
    donate: bool = True,
    frozen_shardings: Any = None,
    activation_rules: Rules | None = None,
) -> Callable:
    """Jit RL's `update(state, experience, ptx_batch, key) -> (state, metrics)`, or with
    `frozen_shardings` `update(state, experience, ptx_batch, key, frozen)` (a LoRA policy
    reads its base there; never donated).

    The ptx batch ([epochs, minibatches, ptx_batch, L], or None) is split along its third
    dimension; feed it with `make_global_batch(..., batch_axis=2)`.
    """
    rep = replicated(mesh)
    ptx = batch_sharding(mesh, rules, ndim=3, batch_axis=2)
    frozen = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(
        _traced(update_fn, mesh, rules, activation_rules),
        in_shardings=(state_shardings, experience_shardings(mesh, rules), ptx, rep, *frozen),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,) if donate else (),
    )


def jit_eval(
    eval_fn: Callable, mesh: Mesh, rules: Rules, activation_rules: Rules | None = None
) -> Callable:
    """Jit an evaluation `fn(params, batch) -> per-row outputs` (held-out losses, scores,
    log-probs) like the training programs: traced under the activation rules, so on a mesh
    the model's activations stay split by rows, and every output split by rows like the
    batch. The inputs arrive placed (weights in their shardings, the batch by
    `make_global_batch`), so their shardings are the arrays' own."""
    return jax.jit(
        _traced(eval_fn, mesh, rules, activation_rules),
        out_shardings=batch_sharding(mesh, rules, 1),
    )
