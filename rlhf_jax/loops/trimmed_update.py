"""The RL update program run on the experience cut to its real columns (`ppo.trim_update`,
`steps/rl_trim.py`): one compiled program per length bucket, each compiled on first use."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from rlhf_jax.loops.train import CompiledOnce
from rlhf_jax.sharding import experience_shardings
from rlhf_jax.sharding.rules import replicated
from rlhf_jax.steps.rl_trim import real_extent, trim_experience, trimmed_lengths


class TrimmedUpdate:
    """`update(state, exp, ptx_batch, key)`: the host reads the iteration's real extent (one
    small device-to-host read), cuts the experience to its length bucket on device and runs
    that bucket's program. `extra`: arguments after the key (a LoRA policy's frozen base);
    `per_doubling`: `ppo.buckets_per_doubling`."""

    def __init__(self, jitted: Callable, mesh, rules, extra: tuple = (), per_doubling: int = 1):
        self.jitted, self.extra, self.per_doubling = jitted, extra, per_doubling
        self.programs: dict[tuple[int, int], CompiledOnce] = {}
        self._extent = jax.jit(real_extent, out_shardings=replicated(mesh))
        self._trim = jax.jit(
            trim_experience, static_argnums=(1, 2), out_shardings=experience_shardings(mesh, rules)
        )

    def lengths(self, exp) -> tuple[int, int]:
        """The (prompt, response) columns the update of `exp` runs on."""
        extent = self._extent(exp).addressable_data(0)  # replicated: every process reads it
        n = exp.response_ids.shape[1]
        p = exp.sequence_ids.shape[1] - n
        extent = tuple(int(v) for v in np.asarray(extent))
        return trimmed_lengths(extent, p, n, self.per_doubling)

    def cut(self, exp):
        """`exp` cut to its length bucket (on device; `exp` itself when that is all of it)."""
        p, n = self.lengths(exp)
        full = exp.response_ids.shape[1]
        if (p, n) != (exp.sequence_ids.shape[1] - full, full):
            exp = self._trim(exp, p, n)
        return exp

    def __call__(self, state, exp, ptx_batch, key):
        exp = self.cut(exp)
        shape = (exp.sequence_ids.shape[1] - exp.response_ids.shape[1], exp.response_ids.shape[1])
        program = self.programs.setdefault(shape, CompiledOnce(self.jitted))
        return program(state, exp, ptx_batch, key, *self.extra)

    def peak_bytes(self) -> int:
        """The largest per-device peak of the buckets compiled so far."""
        return max((c.peak_bytes() for c in self.programs.values()), default=0)
