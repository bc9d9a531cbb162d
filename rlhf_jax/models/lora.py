"""LoRA adapters: where they live, how they split from and fold into the base weights.

An adapted model is its `ModelConfig` with `lora_rank > 0` and a parameter tree that holds,
next to each targeted projection's `kernel`, `lora_a` [*in, r] and `lora_b` [r, *out] (created
by the layers themselves, so they carry logical axis names and shard like the rest). Training
splits that tree in two: the adapters, which the optimizer sees, and the base, which it never
does. The same base weights under `without_lora(config)` are the model with its adapters
switched off: RL's reference policy, with no second copy of the weights.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import init_params

ADAPTER_LEAVES = ("lora_a", "lora_b")


def with_lora(config: ModelConfig, rank: int, alpha: float, targets: Sequence[str]) -> ModelConfig:
    """`config` with adapters of `rank` on `targets` (those the family has: GPT-2 has no gate)."""
    present = [t for t in targets if t != "gate" or config.gated_mlp]
    return config.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=tuple(present))


def without_lora(config: ModelConfig) -> ModelConfig:
    """The base model's config: adapters switched off."""
    return config.replace(lora_rank=0, lora_targets=())


def split_adapters(params: Any) -> tuple[Any, Any]:
    """`(base, adapters)` of a nested dict of weights; each keeps only its own leaves (and
    the dicts leading to them), so `merge_trees(base, adapters)` gives `params` back."""
    if not isinstance(params, dict):
        return params, None
    base, adapters = {}, {}
    for k, v in params.items():
        if k in ADAPTER_LEAVES:
            adapters[k] = v
            continue
        b, a = split_adapters(v)
        base[k] = b
        if a:
            adapters[k] = a
    return base, adapters


def merge_trees(base: Any, extra: Any) -> Any:
    """Nested dicts with disjoint leaves joined into one (a base and its adapters; a frozen
    trunk and a trained head)."""
    if extra is None:
        return base
    if base is None:
        return extra
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_trees(base[k], v) if k in base and isinstance(v, dict) else v
    return out


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def init_adapters(config: ModelConfig, key: jax.Array, shardings: Any = None) -> dict:
    """Fresh adapters of an adapted `config` (A random, B zero), computed straight into
    `shardings` (the adapter part of the full tree's); the base weights this traces are
    dead code to XLA and never allocated."""
    if not config.lora_rank:
        raise ValueError("init_adapters needs a config with lora_rank > 0")

    def fn(k):
        return split_adapters(init_params(config, k))[1]

    return jax.jit(fn, out_shardings=shardings)(key)


def _fold_node(node: dict, scale: float) -> dict:
    """One projection: kernel + scale * A @ B, adapters removed. A is [*batch, *in, r], B
    [*batch, r, *out] and the kernel [*batch, *in, *out] (batch: the scan's layer axis)."""
    node = dict(node)
    a, b = node.pop("lora_a"), node.pop("lora_b")
    w = node["kernel"]
    n_batch = a.ndim + b.ndim - 2 - w.ndim
    batch, r = a.shape[:n_batch], a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*batch, -1, r)
    b2 = b.astype(jnp.float32).reshape(*batch, r, -1)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
    node["kernel"] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return node


def _fold(params: Any, scale: float) -> Any:
    if not isinstance(params, dict):
        return params
    if "lora_a" in params:
        return _fold_node(params, scale)
    return {k: _fold(v, scale) for k, v in params.items()}


@functools.partial(jax.jit, static_argnums=0)
def _fold_jit(scale: float, params):
    return _fold(params, scale)


def fold_adapters(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """`(base config, base-shaped weights)` with every adapter folded in: W + (alpha/r) A B.
    What `save_hf` writes for an adapted model, and what transformers loads. `params` may
    be a scalar model's `{"trunk", "head"}`."""
    if not config.lora_rank:
        return config, params
    return without_lora(config), _fold_jit(config.lora_scale, params)
