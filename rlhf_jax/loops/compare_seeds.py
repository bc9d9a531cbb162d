"""`compare.seeds`: every row of `rlhf-jax compare` trained and evaluated once per seed, and
the report's numbers as means over seeds with a Student-t 95% interval across them.

Seed s (0-based) of a row runs with `seed = cfg.seed + s`: its RL (or offline preference) keys
come from that seed exactly as the foundation derives its own keys from `cfg.seed`, and so do
its data order and evaluation samples. The foundation (pretraining, SFT, the reward model) and
the SFT evaluation are shared: built once from `cfg.seed`, so the seeds measure the spread of
the RL algorithm alone. Seed 0 is the single-seed run itself (same stage, same keys), so
`compare.seeds=1` reproduces the single-seed report number for number.

Each row x seed is its own checkpoint stage and policy folder: seed 0 keeps the row's name,
seed s > 0 is `<name>.seed<s>` (a '.' no row name may hold, so no user row can collide).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rlhf_jax.config import Config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.intervals import student_t_interval
from rlhf_jax.loops.foundation import Foundation, stage_keys

MAX_SEED = 2**32 - 1  # jax.random.key keeps 32 bits (Config.seed's range)

# What a report's `_ci` means, per number of seeds (report.json `interval`, the table).
BOOTSTRAP = "95% bootstrap interval over held-out prompts (one seed)"
T_OVER_SEEDS = (
    "95% Student-t interval of the mean over {n} seeds (a share's clipped to [0, 1], a "
    "difference of shares to [-1, 1])"
)
# The range each bounded report number can take: its t interval is clipped to it. Shares of
# prompts or pairs (compare.py, compare_rlvr.py) and the paired gain in exact accuracy. Not
# here: the gold reward and its gain (unbounded), the KL estimate (a sample mean of log-ratio
# estimates, which can fall below 0), times and memory.
METRIC_RANGE: dict[str, tuple[float, float]] = {
    **dict.fromkeys(
        (
            "accuracy",
            "lenient_accuracy",
            "format_rate",
            "sampled_accuracy",
            "win_rate_vs_sft",
            "heldout_pair_accuracy",
        ),
        (0.0, 1.0),
    ),
    "gain": (-1.0, 1.0),
}


def check_seeds(cfg: Config) -> None:
    """The last seed must still be a valid seed (jax keeps 32 bits of it)."""
    last = cfg.seed + cfg.compare.seeds - 1
    if last > MAX_SEED:
        raise RlhfJaxError(
            f"config key 'compare.seeds': {cfg.compare.seeds} seeds from seed {cfg.seed} reach "
            f"seed {last}, above {MAX_SEED}; lower seed or compare.seeds"
        )


def label(name: str, s: int) -> str:
    """The row x seed's name: its policy folder, its stage suffix, its facts."""
    return name if s == 0 else f"{name}.seed{s}"


def seeded(run: Config, f: Foundation, s: int) -> tuple[Config, Foundation]:
    """Seed s of a row: the run's config and the foundation with the keys of `seed + s`.
    Seed 0 returns both unchanged (bitwise the single-seed run)."""
    if s == 0:
        return run, f
    seed = run.seed + s
    return dataclasses.replace(run, seed=seed), dataclasses.replace(f, keys=stage_keys(seed))


def interval_text(seeds: int) -> str:
    return BOOTSTRAP if seeds == 1 else T_OVER_SEEDS.format(n=seeds)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def combine(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One report row from a row's per-seed rows. One seed: that row unchanged. More: every
    number of seed 0's row becomes the mean over seeds with `<key>_ci`, the Student-t 95%
    interval across seeds (in place of the bootstrap over prompts; clipped to the metric's range
    where it has one, METRIC_RANGE) and `<key>_seeds`, the
    per-seed values; `peak_device_mib` is the largest of the seeds (one program, one peak).
    Everything else (setup, samples) is seed 0's."""
    if len(per_seed) == 1:
        return per_seed[0]
    row = dict(per_seed[0])
    for key, value in per_seed[0].items():
        if key.endswith("_ci") or not (_number(value) or value is None):
            continue
        values = [r[key] for r in per_seed]
        if key == "peak_device_mib":
            known = [v for v in values if v is not None]
            row[key] = max(known) if known else None
            row[f"{key}_seeds"] = values
        elif all(_number(v) for v in values):
            mean, lo, hi = student_t_interval([float(v) for v in values], METRIC_RANGE.get(key))
            row[key], row[f"{key}_ci"], row[f"{key}_seeds"] = mean, (lo, hi), values
    row["seeds"] = len(per_seed)
    return row
