"""`rlhf-jax plan --per-device-batch B`: every stage's batch rescaled so that each device holds
B rows in one micro-batch, whatever the device count. Comparing plans at N = 4, 8, 16 devices
then compares programs of the same per-device shape (weak scaling), which is the question a
pod user asks ("does adding chips lower my per-chip memory?"); hand-edited batch sizes would
have to be recomputed for every N and every grad_accum.

What is kept from the config (after its overrides): every `grad_accum`,
`ppo.samples_per_prompt`, the number of PPO minibatches per epoch and of experience
micro-batches; what is set, with D the devices the batch is split over (the mesh axes of the
`batch` rule, `data` x `fsdp` by default):

- `pretrain/sft/rm/dpo.batch_size` = B x D x that stage's `optim.grad_accum`;
- `ppo.minibatch_size` = B x D x `ppo.policy_optim.grad_accum`, `ppo.rollout_batch` = the
  minibatches per epoch x that / `ppo.samples_per_prompt` (prompts), `ptx.batch_size` = the
  minibatch's rows (ptx batches ride along with each minibatch), and a nonzero
  `ppo.experience_micro_batch` = the iteration's responses / its number of micro-batches.
"""

from __future__ import annotations

import math

from rlhf_jax.config import Config
from rlhf_jax.errors import RlhfJaxError


def batch_ways(cfg: Config, mesh_shape: dict[str, int]) -> int:
    """How many ways the mesh splits a batch's rows: the product of the mesh axes that the
    `batch` rule names (replicated axes hold every row)."""
    axes = cfg.mesh.rules.get("batch")
    if axes is None:
        return 1
    names = [axes] if isinstance(axes, str) else list(axes)
    return math.prod(mesh_shape.get(a, 1) for a in names)


def per_device_overrides(cfg: Config, rows: int, ways: int) -> list[str]:
    """The `key=value` overrides that give each of the `ways` batch-splitting devices `rows`
    rows per micro-batch in every stage of `cfg` (module docstring)."""
    if rows < 1:
        raise RlhfJaxError(f"--per-device-batch must be >= 1, got {rows}")
    out = [
        f"{name}.batch_size={rows * ways * section.optim.grad_accum}"
        for name, section in (
            ("pretrain", cfg.pretrain),
            ("sft", cfg.sft),
            ("rm", cfg.rm),
            ("dpo", cfg.dpo),
        )
    ]
    p = cfg.ppo
    minibatch = rows * ways * p.policy_optim.grad_accum
    responses = minibatch * (p.episodes // p.minibatch_size)
    if responses % p.samples_per_prompt:
        raise RlhfJaxError(
            f"--per-device-batch {rows}: an iteration's {responses} responses (over {ways} "
            f"devices) are not a whole number of groups of ppo.samples_per_prompt="
            f"{p.samples_per_prompt}; choose a per-device batch that makes them one"
        )
    out += [
        f"ppo.minibatch_size={minibatch}",
        f"ppo.rollout_batch={responses // p.samples_per_prompt}",
        f"ptx.batch_size={minibatch}",
    ]
    if p.experience_micro_batch:  # the same number of micro-batches, each rescaled
        out.append(
            f"ppo.experience_micro_batch={responses // (p.episodes // p.experience_micro_batch)}"
        )
    return out
