"""The RL update with its trunk forwards on packed rows (`ppo.pack_update`,
`steps/rl_pack.py`): one compiled program per number of packed rows (and, with
`ppo.trim_update`, per length bucket), each compiled on first use."""

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
from rlhf_jax.steps.rl_pack import PackLayout, rows_needed
from rlhf_jax.steps.rl_trim import bucket

OVERFLOW = "ppo/pack_overflow_rows"


def pack_layout(ppo: PPOConfig, mesh, rules, rows: int | None = None) -> PackLayout:
    """The packed shape of the update's micro-batches: its rows split by data-parallel shard
    (when the shards divide them; otherwise one group), each group packed into `rows` rows,
    at most (and by default) one per row, the worst case the plan compiles."""
    micro = ppo.minibatch_size // ppo.policy_optim.grad_accum
    dp = data_parallel_size(mesh, rules)
    shards = dp if micro % dp == 0 else 1
    per_group = micro // shards
    return PackLayout(shards, per_group if rows is None else min(rows, per_group))


class PackedUpdate:
    """`update(state, exp, ptx_batch, key)`: the host reads how many packed rows the
    iteration's micro-batches need (one small device-to-host read: the update's own shuffles
    and placements, run ahead), rounds it up to a power of two and runs that program.

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
        self.largest = pack_layout(ppo, mesh, rules)
        self.jitted: dict[int, Callable] = {}
        self.programs: dict[tuple[int, int, int], CompiledOnce] = {}
        needed = functools.partial(
            rows_needed,
            epochs=ppo.epochs,
            minibatch=ppo.minibatch_size,
            grad_accum=ppo.policy_optim.grad_accum,
            shards=self.largest.shards,
        )
        self._needed = jax.jit(needed, out_shardings=replicated(mesh))

    def rows(self, exp, key) -> int:
        """The packed rows per group the update of `exp` under `key` runs with."""
        needed = self._needed(exp.sequence_mask, key).addressable_data(0)  # replicated
        return bucket(max(int(np.asarray(needed)), 1), self.largest.rows)

    def __call__(self, state, exp, ptx_batch, key):
        if self.trim is not None:
            exp = self.trim.cut(exp)
        rows = self.rows(exp, key)
        if rows not in self.jitted:
            self.jitted[rows] = self.jitted_for(self.largest._replace(rows=rows))
        n = exp.response_ids.shape[1]
        shape = (exp.sequence_ids.shape[1] - n, n, rows)
        program = self.programs.setdefault(shape, CompiledOnce(self.jitted[rows]))
        state, metrics = program(state, exp, ptx_batch, key, *self.extra)
        overflow = float(np.asarray(metrics.pop(OVERFLOW).addressable_data(0)))
        if overflow:  # the host's placement and the update's disagree: a bug, not an input
            raise RlhfJaxError(
                f"ppo.pack_update: {overflow:g} rows did not fit the {rows} packed rows the "
                "host planned; please report this with the config"
            )
        return state, metrics

    def peak_bytes(self) -> int:
        """The largest per-device peak of the programs compiled so far."""
        return max((c.peak_bytes() for c in self.programs.values()), default=0)
