"""The RL rollout as named stages when rollout filters are configured (`ppo.rollout_filters`):

  sample -> score (reward model or reward function, then the missing-EOS rule)
         -> filters (`rlhf_jax.filters`, on the scores of the whole global batch)
         -> more rounds until the kept groups fill the batch -> finish_scored

Without filters the RL loop keeps its one-call experience (`loops/rl.py`), whose numerics this
module does not touch. A round's filters see exactly the scores the estimator will see.

Rounds. Round 0 answers the iteration's own prompt batch with the iteration's experience key;
round r >= 1 samples with `round_key = fold_in(key, r)` answers to `ppo.rollout_batch` prompts
drawn from the whole prompt set by `fold_in(round_key, 1)`: every round is a pure function of
the iteration key, so a resumed run replays them exactly, and every process draws the same
prompts. The keep decision
is taken on the host over the globally gathered scores, so every process takes the same one.
Kept groups fill the batch in round order (each round's in its own order); when
`ppo.rollout_max_rounds` rounds leave it short, the rest is filled with round 0's dropped
groups (static shapes; a dropped group's advantages are what the estimator makes of it, 0
under a group baseline for DAPO's filter). Rows are moved on the device, by a compiled
gather; only scores, group ids and response tokens come to the host.

Metrics: `rollout/filter_rounds` (rounds sampled), `rollout/filter_kept_fraction` (sampled
groups that every filter kept), `rollout/filter_filled_fraction` (the batch's groups that
were kept ones: below 1 when the rounds ran out).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.contract.returns import check_filter_returned
from rlhf_jax.loops.host_scoring import host_scorer
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import CompiledOnce
from rlhf_jax.sharding import make_global_batch
from rlhf_jax.steps import policy_weights
from rlhf_jax.steps.algorithm import RLAlgorithm
from rlhf_jax.steps.experience import (
    Rollout,
    Scored,
)

# `draw(key) -> (prompt batch on the mesh, their texts or None)`: a round's extra prompts.
Draw = Callable[[jax.Array], tuple[dict, list[str] | None]]


def prompt_drawer(
    prompts: dict[str, np.ndarray], texts: list[str] | None, size: int, runtime: Runtime
) -> Draw:
    """`draw(key)`: `size` distinct prompt rows chosen by `key` alone (numpy's generator
    seeded with the key's bits: the same rows on every process and in a resumed run)."""
    n = len(prompts["input_ids"])

    def draw(key: jax.Array):
        bits = (
            jax.random.key_data(key)
            if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            else key
        )
        rng = np.random.default_rng(np.asarray(bits).ravel().tolist())
        rows = np.sort(rng.choice(n, size, replace=False))
        host = {k: v[rows] for k, v in prompts.items()}
        batch = runtime.global_batch(host, "ppo.rollout_batch")
        return batch, None if texts is None else [texts[i] for i in rows]

    return draw


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole global array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def keep_groups(algo: RLAlgorithm, rollout: Rollout, scored: Scored, g: int) -> np.ndarray:
    """[B / g] bool, the groups every filter keeps whole, decided over the global batch."""
    view = {
        "scores": _to_host(scored.scores),
        "group_ids": _to_host(rollout.group_ids),
        "response_ids": _to_host(rollout.response_ids),
        "response_mask": _to_host(rollout.response_mask),
    }
    keep = np.ones(view["scores"].shape, bool)
    for name, fn in algo.filters:
        out = fn(view)
        check_filter_returned(f"rollout filter {name!r}", out, view)
        keep &= np.asarray(out)
    return keep.reshape(-1, g).all(axis=1)  # a group's g rows are consecutive (sample)


def merge_fn(g: int) -> Callable:
    """`merge(buffer, new, src, take)`: row j becomes new[src[j]] where take[j], else stays
    buffer[j]; group ids renumbered by position (groups always move whole)."""

    def merge(buffer, new, src, take):
        def pick(b, n):
            t = take.reshape(take.shape + (1,) * (n.ndim - 1))
            return jnp.where(t, jnp.take(n, src, axis=0), b)

        rollout, scored = jax.tree.map(pick, buffer, new)
        ids = jnp.arange(src.shape[0], dtype=jnp.int32) // g
        return rollout._replace(group_ids=ids), scored

    return merge


class _Filling:
    """Host bookkeeping of which batch slots hold kept groups; `place` says where a round's
    groups go as row indices (`src`, `take`) for the compiled merge."""

    def __init__(self, n_groups: int, g: int):
        self.n_groups, self.g, self.filled, self.sampled, self.kept = n_groups, g, 0, 0, 0

    def place(self, keep: np.ndarray, first: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """Rows for this round, or None when the buffer is this round's rollout unchanged.
        The first round's dropped groups go after its kept ones: the fallback filling."""
        kept = np.flatnonzero(keep)
        self.sampled += keep.size
        self.kept += kept.size
        if first:
            order = np.concatenate([kept, np.flatnonzero(~keep)])
            self.filled = kept.size
            slots, groups = np.arange(self.n_groups), order
            if kept.size == keep.size:
                return None
        else:
            n = min(kept.size, self.n_groups - self.filled)
            slots, groups = np.arange(self.filled, self.filled + n), kept[:n]
            self.filled += n
        src = np.zeros(self.n_groups * self.g, np.int32)
        take = np.zeros(self.n_groups * self.g, bool)
        within = np.arange(self.g)
        rows = (slots[:, None] * self.g + within).ravel()
        src[rows] = (groups[:, None] * self.g + within).ravel()
        take[rows] = True
        return src, take

    def metrics(self, rounds: int) -> dict[str, float]:
        return {
            "rollout/filter_rounds": float(rounds),
            "rollout/filter_kept_fraction": self.kept / self.sampled,
            "rollout/filter_filled_fraction": self.filled / self.n_groups,
        }


def fill_rounds(
    sample_round: Callable[[int], Any],
    decide: Callable[[Any], np.ndarray],
    merge: Callable,
    sizes: tuple[int, int, int],
    on_mesh: Callable = lambda src, take: (src, take),
) -> tuple[Any, dict[str, float]]:
    """Sample rounds until the kept groups fill the batch: `(batch, metrics)`.
    sample_round(r): round r's (Rollout, Scored); decide(round) -> [n_groups] bool, the
    groups kept; merge: `merge_fn`'s; sizes: (groups per batch, samples per group, most
    rounds); on_mesh(src, take): the merge's row indices placed like the rows."""
    n_groups, g, max_rounds = sizes
    filling = _Filling(n_groups, g)
    buffer, rounds = None, 0
    while rounds < max_rounds and (buffer is None or filling.filled < n_groups):
        new = sample_round(rounds)
        placed = filling.place(decide(new), first=rounds == 0)
        if placed is None:  # round 0 kept every group: the batch as sampled
            buffer = new
        else:
            buffer = merge(new if buffer is None else buffer, new, *on_mesh(*placed))
        rounds += 1
    return buffer, filling.metrics(rounds)


def _one_round(spec, programs: dict, frozen, runtime: Runtime, tokenizer) -> Callable:
    """`one_round(state, prompt batch, key, texts) -> (Rollout, Scored)` over the build's
    compiled programs: sample and score as one program when the reward model scores; sample,
    host scoring and the missing-EOS rule when a reward function does."""
    algo, ppo, policy_cfg = spec.algo, spec.cfg.ppo, programs["policy_cfg"]
    sample = programs["sample"]
    if algo.reward_fn is None:

        def one_round(state, batch, key, texts):
            return sample(state, frozen, batch["input_ids"], batch["attention_mask"], key)

        return one_round
    if tokenizer is None:
        raise ValueError("a reward function over text needs the tokenizer to decode responses")
    eos_rule, host_score = (
        programs["eos_rule"],
        host_scorer(algo, tokenizer, ppo.samples_per_prompt),
    )

    def one_round(state, batch, key, texts):
        if texts is None:
            raise ValueError("a reward function over text needs the prompts' texts")
        policy = policy_weights(policy_cfg, state, frozen)
        r = sample(policy, batch["input_ids"], batch["attention_mask"], key)
        _, local_scores = host_score(r, texts)  # this process's rows of the rollout
        raw = make_global_batch(local_scores, runtime.mesh, runtime.rules, "ppo.rollout_batch")
        return r, eos_rule(r, raw)

    return one_round


def filtered_experience(
    spec, compiled: dict[str, CompiledOnce], *, policy_cfg, frozen, runtime, tokenizer
) -> Callable:
    """`experience(state, prompt batch, key, prompt texts, draw) -> (Experience, metrics)` for
    a run with rollout filters, over the stage build's compiled round programs (`compiled`:
    sample, eos_rule with a reward function, merge, finish; `loops.build_rl`). spec: the
    build's `RLBuildSpec`; policy_cfg: the config the policy's steps run."""
    ppo, algo, g = spec.cfg.ppo, spec.algo, spec.cfg.ppo.samples_per_prompt
    programs = {**compiled, "policy_cfg": policy_cfg}
    one_round = _one_round(spec, programs, frozen, runtime, tokenizer)
    merge, finish = compiled["merge"], compiled["finish"]

    def experience(state, batch, key, prompt_texts, draw: Draw):
        def sample_round(r: int) -> tuple[Rollout, Scored]:
            if r == 0:
                return one_round(state, batch, key, prompt_texts)
            round_key = jax.random.fold_in(key, r)
            b, texts = draw(jax.random.fold_in(round_key, 1))
            return one_round(state, b, round_key, texts)

        def on_mesh(src, take):
            idx = runtime.global_batch({"src": src, "take": take}, "ppo.rollout_batch")
            return idx["src"], idx["take"]

        sizes = (ppo.rollout_batch, g, ppo.rollout_max_rounds)
        decide = functools.partial(keep_groups, algo, g=g)
        buffer, metrics = fill_rounds(sample_round, lambda new: decide(*new), merge, sizes, on_mesh)
        exp, exp_metrics = finish(state, frozen, *buffer)
        return exp, {**exp_metrics, **metrics}

    return experience
