"""Simulated labelers: ranking rows from sampled completions, as a built-in task's labelers
would rank them (host Python over text; the sampling itself is the caller's)."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np


def rank_samples(
    task: ModuleType,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    seed: int,
    noise: float,
) -> tuple[list[dict], int]:
    """`(rows, unranked)`: one `{"prompt", "completions", "ranking"}` row per prompt whose
    samples hold at least two distinct non-empty texts, ranked by `task.rank_by_labelers`
    with Gaussian `noise`; `unranked` counts the prompts left out. Labelers cannot rank two
    identical texts differently, so each distinct text is kept once."""
    rng = np.random.default_rng(seed)
    rows, unranked = [], 0
    for prompt, texts in zip(prompts, completions):
        distinct = list(dict.fromkeys(c for c in texts if c.strip()))
        if len(distinct) < 2:
            unranked += 1
            continue
        ranking = task.rank_by_labelers(rng, prompt, distinct, noise)
        rows.append({"prompt": prompt, "completions": distinct, "ranking": ranking})
    return rows, unranked
