"""Optimizers and learning-rate schedules from config (optax)."""

from __future__ import annotations

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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping). Updates with non-finite gradients are skipped and
    counted by `optax.apply_if_finite` rather than corrupting the weights."""
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
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=1_000_000)
