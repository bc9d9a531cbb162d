"""Rollout filters, chosen by name from config (`ppo.rollout_filters: [{name, kwargs}]`): parts
that sit between scoring and the rest of the experience and decide which groups of responses
the update trains on.

Signature: `fn(batch, **hparams) -> keep`, pure and jittable, `keep` a [B] bool array (True:
the response may train). `batch` holds, over one sampling round of B responses of N tokens:
  scores [B]            the sequence score, after the missing-EOS rule (what the estimator sees)
  group_ids [B]         samples of the same prompt share an id (ppo.samples_per_prompt of them)
  response_ids [B, N]   the sampled tokens
  response_mask [B, N]  1 up to and including the first EOS
A group is kept only when every one of its responses is (groups stay whole, so group
baselines stay defined), and only when every configured filter keeps it. The rollout stage
(`loops/rollout_stages.py`) samples more rounds, on other prompts, until the kept groups fill
the batch or `ppo.rollout_max_rounds` is reached. Filters declare `min_group_size` like
estimators (checked against `ppo.samples_per_prompt` when the config is loaded).

A fork registers its own with `@register_filter("name")`, or names a function
`package.module:function` in the config; its hyperparameters go under `kwargs:` of its entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import registry
from rlhf_jax.config.schema import AT_LEAST_0, Range
from rlhf_jax.ops import group_size

Arrays = Mapping[str, jax.Array]


def register_filter(
    name: str,
    min_group_size: int = 1,
    reads: tuple = (),
    ranges: Mapping[str, Range] | None = None,
) -> Callable:
    """Decorator registering a rollout filter under `name` with the facts the run needs."""
    return registry.register(
        "rollout_filter",
        name,
        min_group_size=min_group_size,
        reads=reads or ("scores", "group_ids", "response_ids", "response_mask"),
        ranges=dict(ranges or {}),
    )


def get_filter(name: str, **hparams: Any) -> Callable[[Arrays], jax.Array]:
    """The filter registered as `name` (or "package.module:function"), hparams bound."""
    return registry.resolve("rollout_filter", name, **hparams)


def whole_groups(keep_B: jax.Array, group_ids_B: jax.Array) -> jax.Array:
    """[B] bool: True where every response of the row's group is kept."""
    ids_B = jnp.asarray(group_ids_B, jnp.int32)
    b = ids_B.shape[0]
    kept = jax.ops.segment_sum(jnp.asarray(keep_B, jnp.float32), ids_B, num_segments=b)[ids_B]
    return kept == group_size(ids_B)


@register_filter(
    "dynamic_sampling",
    min_group_size=2,
    reads=("scores", "group_ids"),
    ranges={"min_spread": AT_LEAST_0},
)
def dynamic_sampling(batch: Arrays, min_spread: float = 0.0) -> jax.Array:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, eq. 11: keep a prompt only if
    `0 < |{correct outputs}| < G`): drop every group whose scores all agree, whose group
    baseline leaves every advantage 0 and so no gradient, only dilution of the others. A group
    is kept when its scores' spread `max - min` exceeds `min_spread` (0: any disagreement;
    exact, unlike a float std that rounding can leave just above 0)."""
    scores_B = jnp.asarray(batch["scores"], jnp.float32)
    ids_B = jnp.asarray(batch["group_ids"], jnp.int32)
    b = ids_B.shape[0]
    hi = jax.ops.segment_max(scores_B, ids_B, num_segments=b)[ids_B]
    lo = jax.ops.segment_min(scores_B, ids_B, num_segments=b)[ids_B]
    return hi - lo > min_spread
