"""What a plan compiles, without a single weight: model configs (from a checkpoint's
config.json only, or the random model's shape), parameter trees and states as
`jax.ShapeDtypeStruct`s carrying their shardings, batches of the shapes the stages feed, and
the bytes each device holds of any such tree."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from rlhf_jax.config import Config
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.stages import random_model_config
from rlhf_jax.models import ModelConfig, param_shapes, scalar_trunk
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.sharding import (
    batch_sharding,
    check_batch_divisible,
    replicated,
    state_shardings,
)
from rlhf_jax.storage import local_copy


class _TaskVocab:
    """What `random_model_config` reads of the built-in task's tokenizer: its size (at most
    `task.vocab_size`; BPE may stop short of it) and the special ids it fixes (pad 0, eos 1,
    bos 2), without training it."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def base_model(cfg: Config, path: str | None) -> ModelConfig:
    """The model a stage starts from, as `loops.setup.load_model` would configure it: the
    checkpoint's config.json (weights untouched) with the run's dtypes, remat and
    logits_chunk, or the
    built-in task's random model."""
    if path is None:
        return random_model_config(cfg.model, _TaskVocab(cfg.task.vocab_size))
    m = cfg.model
    return read_hf_config(path).replace(
        param_dtype=m.param_dtype,
        dtype=m.dtype,
        remat=m.remat,
        attention=m.attention,
        logits_chunk=m.logits_chunk,
    )


def reward_model(cfg: Config, path: str) -> ModelConfig:
    """A reward-model folder as `load_scalar_model` configures it: no LM head in the trunk,
    the run's dtypes, and (as that loader does) no remat switch."""
    m = cfg.model
    return read_hf_config(path).replace(
        param_dtype=m.param_dtype, dtype=m.dtype, tie_embeddings=True, attention=m.attention
    )


def with_shardings(tree: Any, shardings: Any) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs with the matching sharding of `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def scalar_shapes(model_cfg: ModelConfig) -> dict:
    """`{"trunk", "head"}` of a reward or value model (the trunk without an LM head, as the
    loops build it: `models.scalar_trunk`)."""
    head = jax.ShapeDtypeStruct((model_cfg.d_model,), model_cfg.weight_dtype)
    bias = jax.ShapeDtypeStruct((), model_cfg.weight_dtype)
    return {"trunk": scalar_trunk(param_shapes(model_cfg)), "head": {"kernel": head, "bias": bias}}


def model_params(model_cfg: ModelConfig, runtime: Runtime, scalar: bool = False):
    """`(abstract weights, shardings)` of a decoder, or of a scalar model with `scalar`."""
    shardings = runtime.param_shardings(model_cfg, scalar=scalar)
    shapes = scalar_shapes(model_cfg) if scalar else param_shapes(model_cfg)
    return with_shardings(shapes, shardings), shardings


def abstract_state(
    create: Callable, inputs: tuple, input_shardings: tuple, runtime: Runtime
) -> tuple[Any, Any]:
    """`(abstract state, its shardings)`: `sharding.init_sharded_state` without computing
    anything (the same `create`, the same sharding rule for every leaf)."""
    shapes = jax.eval_shape(create, *inputs)
    shardings = state_shardings(shapes, runtime.mesh, *zip(inputs, input_shardings))
    return with_shardings(shapes, shardings), shardings


def nbytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with or without a sharding; the
    most loaded device when a dimension does not split evenly)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * leaf.dtype.itemsize  # (a PRNG key's dtype has one too)
    return int(total)


def _rows(
    runtime: Runtime, shapes: dict[str, tuple], dtypes: dict[str, Any], key: str, axis: int = 0
) -> dict:
    """A batch of ShapeDtypeStructs split along `axis` over the batch mesh axes; the same
    RlhfJaxError as the run's when config key `key` does not split over them."""
    rows = next(iter(shapes.values()))[axis]
    check_batch_divisible(rows, runtime.mesh, runtime.rules, key)
    out = {}
    for key, shape in shapes.items():
        sharding = batch_sharding(runtime.mesh, runtime.rules, len(shape), axis)
        out[key] = jax.ShapeDtypeStruct(shape, dtypes.get(key, jnp.float32), sharding=sharding)
    return out


def lm_batch(runtime: Runtime, rows: int, length: int, key: str, packed: bool = False) -> dict:
    """An SFT / pretraining batch as `data.encode_sft` / `encode_texts` build it."""
    keys = ["input_ids", "attention_mask", "loss_mask"] + (["segment_ids"] if packed else [])
    ints = {"input_ids": jnp.int32, "segment_ids": jnp.int32}
    return _rows(runtime, dict.fromkeys(keys, (rows, length)), ints, key)


def ranking_batch(
    runtime: Runtime, rows: int, k: int, length: int, key: str, ref_logps: bool
) -> dict:
    """A ranking batch as `data.encode_rankings` builds it (+ DPO's reference log-probs)."""
    shapes = {
        "input_ids": (rows, k, length),
        "attention_mask": (rows, k, length),
        "completion_mask": (rows, k),
        "rank": (rows, k),
        "completion_start": (rows,),
    }
    if ref_logps:
        shapes["ref_logps"] = (rows, k)
    ints = {"input_ids": jnp.int32, "rank": jnp.int32, "completion_start": jnp.int32}
    return _rows(runtime, shapes, ints, key)


def prompt_batch(runtime: Runtime, rows: int, length: int) -> tuple:
    """`(prompt_ids, prompt_mask)` as `data.encode_prompts` builds them."""
    shapes = {"ids": (rows, length), "mask": (rows, length)}
    b = _rows(runtime, shapes, {"ids": jnp.int32}, "ppo.rollout_batch")
    return b["ids"], b["mask"]


def ptx_batch(runtime: Runtime, epochs: int, n_mb: int, rows: int, length: int) -> dict:
    """The RL update's pretraining batches, [epochs, minibatches, rows, length]."""
    shape = (epochs, n_mb, rows, length)
    shapes = {"input_ids": shape, "attention_mask": shape}
    return _rows(runtime, shapes, {"input_ids": jnp.int32}, "ptx.batch_size", axis=2)


def rows_like(runtime: Runtime, tree: Any) -> Any:
    """`tree`'s leaves (arrays of rows, e.g. an Experience) split over the batch axes."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=batch_sharding(runtime.mesh, runtime.rules, x.ndim)
        ),
        tree,
    )


def step_key(runtime: Runtime) -> jax.ShapeDtypeStruct:
    """A PRNG key, replicated, as every step takes one."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(runtime.mesh))


def ranking_k(path: str | None, default: int) -> int:
    """K of a rankings file (its largest number of completions per row, as the encoder pads
    to), read without tokenizing; `default` (rm.k, the built-in task's) without a file."""
    if path is None:
        return default
    path = local_copy(path, "data file")  # a URL's cached copy; a local path as it is
    if not path.is_file():
        return default
    k = 2
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the loaders report bad rows; the plan only needs the widest one
            if isinstance(row, dict) and isinstance(row.get("completions"), list):
                k = max(k, len(row["completions"]))
    return k
