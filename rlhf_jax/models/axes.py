"""Logical axis names on activations: `constrain(x, "batch", "length", "embed")`.

Weights carry logical names from their creation (`layers._param`); activations get theirs
here, at the few points that decide how a layer is partitioned (the residual stream, the
attention heads, the MLP's hidden layer, the logits). Without them XLA's partitioner is free
to contract over a sharded model dimension instead, and on an FSDP mesh it did: the LM head's
weight is split on `embed` over the same mesh axis as the batch, and it all-gathered the
*global batch's* float32 logits onto every device.

Nothing here knows a mesh: `rlhf_jax.sharding.activation_sharding(mesh, rules)` installs,
for the duration of a trace, the function that turns logical names into a sharding. Outside
it (tests, one device, eager calls) `constrain` returns its input untouched, so numerics on
one device are unchanged to the bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import jax

# (logical names, shape) -> the sharding to constrain to, or None to leave the array alone.
# Hashable (equal for equal mesh and rules): see `active_resolver`.
Resolver = Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding | None]

_RESOLVER: ContextVar[Resolver | None] = ContextVar("rlhf_jax_activation_resolver", default=None)


@contextlib.contextmanager
def activation_resolver(resolver: Resolver | None) -> Iterator[None]:
    """While tracing inside this block, `constrain` asks `resolver` for each activation's
    sharding (the sharding package builds one from a mesh and its rules)."""
    token = _RESOLVER.set(resolver)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def active_resolver() -> Resolver | None:
    """The resolver `constrain` uses now. A function jitted on its own and called inside a
    traced step (generation's `_generate`) takes it as a static argument: jax caches a jitted
    function's trace by its arguments, and a trace made outside the rules (by `eval_shape`,
    say) would otherwise be reused without its constraints. Resolvers are hashable."""
    return _RESOLVER.get()


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """`x` constrained to the sharding its logical `axes` (one per dimension; None: a
    dimension no mesh axis splits) map to under the active rules; `x` itself when no rules are
    active or they shard nothing."""
    resolve = _RESOLVER.get()
    if resolve is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for an array of shape {x.shape}")
    sharding = resolve(axes, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
