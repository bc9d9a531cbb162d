"""What the RL update is built from and what its scans carry, named: `UpdateConfig` (all the
settings the update reads, fixed per run), and the per-epoch, per-minibatch inputs and
whole-minibatch normalisers the module-level functions of `steps/rl_update.py` pass on.

NamedTuples are pytrees that flatten exactly as the tuples they replace, so naming a scan's
inputs changes nothing in the compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax

from rlhf_jax.config import PPOConfig
from rlhf_jax.models import ModelConfig
from rlhf_jax.steps.algorithm import RLAlgorithm
from rlhf_jax.steps.rl_pack import PackLayout
from rlhf_jax.types import LossOut


def uses_ptx(ptx_coef: float, has_ptx: bool = True) -> bool:
    """Whether the RL update adds the pretraining (ptx) term: a positive `ptx.coef` and a
    ptx loss / ptx data to apply it to (`has_ptx`). The one rule the loop, the planner and
    the update share."""
    return has_ptx and ptx_coef > 0


@dataclasses.dataclass(frozen=True, eq=False)
class UpdateConfig:
    """Everything the RL update reads besides its arguments (`make_update_fn`'s parameters)."""

    policy_cfg: ModelConfig
    critic_cfg: ModelConfig | None
    ppo: PPOConfig
    algo: RLAlgorithm
    ptx_loss_fn: Callable[..., LossOut] | None = None
    ptx_coef: float = 0.0
    grad_accum: int = 1
    pack: PackLayout | None = None  # the trunk forwards on packed rows (`ppo.pack_update`)

    @property
    def use_ptx(self) -> bool:
        return uses_ptx(self.ptx_coef, self.ptx_loss_fn is not None)

    @property
    def kl_in_loss(self) -> bool:
        return self.algo.kl_penalty == "loss"


class EpochInputs(NamedTuple):
    """What the epoch scan reads per epoch."""

    key: jax.Array  # the epoch's shuffle key
    ptx: dict | None  # the epoch's pretraining batches [n_minibatches, ptx_bs, L], or None


class MinibatchInputs(NamedTuple):
    """What the minibatch scan reads per minibatch."""

    rows: jax.Array  # [minibatch_size] the experience rows of this minibatch
    ptx: dict | None  # its pretraining batch [ptx_bs, L] (`input_ids`, `attention_mask`)


class Normalisers(NamedTuple):
    """The whole minibatch's values every micro-batch's losses divide by or read
    (`losses.accumulation`), computed before the minibatch is split."""

    counts: dict  # the policy (and value) loss's counts: token_count, sequence_count, ...
    beta: jax.Array  # the KL coefficient
    iteration: jax.Array
    ptx: dict  # the ptx loss's counts ({} without ptx)

    def scalars(self) -> dict:
        """What the policy and value losses see next to the minibatch's arrays."""
        return {**self.counts, "beta": self.beta, "iteration": self.iteration}
