"""Metrics from several writers merged into one log line, without one silently overwriting
another.

A step's metrics come from the parts a config chose (a policy loss, a value loss, an
estimator, ...) and from the library itself (`ppo/loss/total`, `rollout/...`). A fork's loss
that returns a name another writer also uses would otherwise replace that number in
metrics.jsonl without a word. The names are Python strings, known when the step is traced, so
the clash is an error before the first update is applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf_jax.errors import RlhfJaxError


def merged_metrics(*sources: tuple[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One dict from `(writer, metrics)` pairs, e.g. `("the policy loss (ppo.policy_loss)",
    pol.metrics)`; RlhfJaxError naming both writers when two return the same metric name."""
    out: dict[str, Any] = {}
    writer_of: dict[str, str] = {}
    for writer, metrics in sources:
        for name, value in metrics.items():
            if name in out:
                raise RlhfJaxError(
                    f"metric {name!r} is written by both {writer_of[name]} and {writer}; one "
                    "would overwrite the other in metrics.jsonl: rename the part's metric"
                )
            out[name] = value
            writer_of[name] = writer
    return out
