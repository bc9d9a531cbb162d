"""The RL update with its trunk forwards on packed rows (`ppo.pack_update`,
`steps/rl_pack.py`): one compiled program per number of packed rows and of response-token
slots (and, with `ppo.trim_update`, per length bucket), each compiled on first use."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

from rlhf_jax.config import PPOConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.train import CompiledOnce
from rlhf_jax.loops.trimmed_update import TrimmedUpdate
from rlhf_jax.sharding import data_parallel_size
from rlhf_jax.sharding.rules import replicated
from rlhf_jax.steps.rl_pack import PackLayout, pack_needs
from rlhf_jax.steps.rl_trim import bucket

OVERFLOW = "ppo/pack_overflow"  # rows and response tokens that did not fit


def pack_layout(ppo: PPOConfig, mesh, rules) -> PackLayout:
    """The largest packed shape of the update's micro-batches, the worst case the plan
    compiles: its rows split by data-parallel shard (when the shards divide them; otherwise
    one group), each group packed into one packed row per row, with a response slot for
    every response column of its rows."""
    micro = ppo.minibatch_size // ppo.policy_optim.grad_accum
    dp = data_parallel_size(mesh, rules)
    shards = dp if micro % dp == 0 else 1
    per_group = micro // shards
    return PackLayout(shards, per_group, per_group * ppo.max_new_tokens)


class PackedUpdate:
    """`update(state, exp, ptx_batch, key)`: the host reads how many packed rows and response
    slots the iteration's micro-batches need (one small device-to-host read: the update's own
    shuffles and placements, run ahead), rounds each up to its bucket (a power of two, or
    finer with `ppo.buckets_per_doubling`) and runs that program.

    jitted_for: `PackLayout -> jitted update` (`loops/build_rl.rl_programs`). trim: the
    `TrimmedUpdate` that cuts the experience first (`ppo.trim_update`), or None. `extra`:
    arguments after the key (a LoRA policy's frozen base)."""

    def __init__(
        self,
        jitted_for: Callable,
        ppo: PPOConfig,
        mesh,
        rules,
        extra: tuple = (),
        trim: TrimmedUpdate | None = None,
    ):
        self.jitted_for, self.extra, self.trim = jitted_for, extra, trim
        self.per_doubling = ppo.buckets_per_doubling
        self.largest = pack_layout(ppo, mesh, rules)
        self.jitted: dict[PackLayout, Callable] = {}
        self.programs: dict[tuple[int, int, int, int], CompiledOnce] = {}
        needed = functools.partial(
            pack_needs,
            epochs=ppo.epochs,
            minibatch=ppo.minibatch_size,
            grad_accum=ppo.policy_optim.grad_accum,
            shards=self.largest.shards,
        )
        self._needed = jax.jit(
            needed, static_argnames="response_len", out_shardings=replicated(mesh)
        )

    def layout(self, exp, key) -> PackLayout:
        """The packed layout the update of `exp` under `key` runs with: packed rows and
        response slots per group, each the need rounded up to its bucket."""
        n = exp.response_ids.shape[1]
        needed = self._needed(exp.sequence_mask, key, response_len=n).addressable_data(0)
        rows, tokens = (max(int(x), 1) for x in np.asarray(needed))  # replicated
        per_group = self.largest.rows
        k = self.per_doubling
        return self.largest._replace(
            rows=bucket(rows, per_group, k), tokens=bucket(tokens, per_group * n, k)
        )

    def __call__(self, state, exp, ptx_batch, key):
        if self.trim is not None:
            exp = self.trim.cut(exp)
        layout = self.layout(exp, key)
        if layout not in self.jitted:
            self.jitted[layout] = self.jitted_for(layout)
        n = exp.response_ids.shape[1]
        shape = (exp.sequence_ids.shape[1] - n, n, layout.rows, layout.tokens)
        program = self.programs.setdefault(shape, CompiledOnce(self.jitted[layout]))
        state, metrics = program(state, exp, ptx_batch, key, *self.extra)
        overflow = float(np.asarray(metrics.pop(OVERFLOW).addressable_data(0)))
        if overflow:  # the host's placement and the update's disagree: a bug, not an input
            raise RlhfJaxError(
                f"ppo.pack_update: {overflow:g} rows or response tokens did not fit the "
                f"{layout.rows} packed rows and {layout.tokens} response slots the host "
                "planned; please report this with the config"
            )
        return state, metrics

    def peak_bytes(self) -> int:
        """The largest per-device peak of the programs compiled so far."""
        return max((c.peak_bytes() for c in self.programs.values()), default=0)
