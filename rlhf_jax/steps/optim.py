"""Optimizers and learning-rate schedules from config (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine/linear decay to `lr * final_lr_ratio` (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.final_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), decay], boundaries=[warmup]
    )


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, except that an update is skipped (zero change, optimizer state kept) when the
    gradients *or the update computed from them* hold a NaN/Inf, and counted in optax's
    `ApplyIfFiniteState` (`notfinite_count` in a row, `total_notfinite`).

    `optax.apply_if_finite` looks at the gradients only: finite gradients can still give a
    non-finite update (Adam with eps = 0 on a zero gradient is 0/0), which would then be
    written into the weights.
    """

    def all_finite(tree) -> jax.Array:
        return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update(grads, state, params=None):
        def attempt(_):
            updates, inner_state = inner.update(grads, state.inner_state, params)
            return updates, inner_state, all_finite(updates)

        def reject(_):
            return jax.tree.map(jnp.zeros_like, grads), state.inner_state, jnp.array(False)

        updates, inner_state, out_ok = jax.lax.cond(all_finite(grads), attempt, reject, None)
        ok = out_ok  # False whenever the gradients were not finite either
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), inner_state, state.inner_state
        )
        one = jnp.ones([], jnp.int32)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(ok, 0, state.notfinite_count + one),
            last_finite=ok,
            total_notfinite=jnp.where(ok, state.total_notfinite, state.total_notfinite + one),
            inner_state=inner_state,
        )

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping). Updates whose gradients or results hold a NaN/Inf are
    skipped and counted (`skip_non_finite`) rather than corrupting the weights."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            make_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            eps_root=cfg.eps_root,
            mu_dtype=None if cfg.mu_dtype is None else jnp.dtype(cfg.mu_dtype),
            weight_decay=cfg.weight_decay,
        )
    )
    return skip_non_finite(optax.chain(*parts))
