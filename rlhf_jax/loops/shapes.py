"""A stage's batches as `jax.ShapeDtypeStruct`s carrying their shardings: the shapes the
data encoders build (`data.encode_sft`, `encode_rankings`, `encode_prompts`), split over the
batch mesh axes as the loops place them, and the bytes each device holds of any such tree.
The stage builders (`loops/build*.py`) describe their programs' inputs with these; the plan
compiles on them, the loops feed real arrays of the same shapes."""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from rlhf_jax.data.pack import PROMPTS_PER_ROW
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import batch_sharding, check_batch_divisible, replicated
from rlhf_jax.storage import local_copy


def with_shardings(tree: Any, shardings: Any) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs with the matching sharding of `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


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


def packed_ranking_batch(
    runtime: Runtime, rows: int, k: int, length: int, key: str, ref_logps: bool
) -> dict:
    """A ranking batch as `data.pack_rankings` packs it: `rows` rows of K * L tokens, each
    with `PROMPTS_PER_ROW` prompt slots (+ DPO's reference log-probs)."""
    p = PROMPTS_PER_ROW
    shapes = {
        "input_ids": (rows, k * length),
        "attention_mask": (rows, k * length),
        "segment_ids": (rows, k * length),
        "completion_mask": (rows, p, k),
        "rank": (rows, p, k),
        "completion_start": (rows, p),
    }
    if ref_logps:
        shapes["ref_logps"] = (rows, p, k)
    ints = dict.fromkeys(("input_ids", "segment_ids", "rank", "completion_start"), jnp.int32)
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
