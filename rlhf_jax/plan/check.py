"""`rlhf-jax plan --check`: the switches the plan names for a stage that does not fit,
compiled. The advice (`plan/advice.py`) is arithmetic on the first plan's parts; it has been
wrong by 10-20% more than once (docs/memory.md, "Switches"). Planning the stage again with the
switch applied is the check, and this module does it for the user: each switch that fits
alone, or else the switches named together, re-planned for that stage only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.plan.advice import Context, suggestions, together
from rlhf_jax.plan.planner import StagePlan


@dataclasses.dataclass(frozen=True)
class Check:
    """One named switch, compiled: the stage's peak with it, or why it could not be planned."""

    switch: str
    estimated: int  # the advice's peak, bytes per device
    peak: int | None  # compiled; None when planning with the switch failed
    fits: bool
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "switch": self.switch,
            "estimated_peak_bytes_per_device": self.estimated,
            "peak_bytes_per_device": self.peak,
            "fits": self.fits,
            "error": self.error,
        }


def switches_to_check(stage: StagePlan, ctx: Context) -> list[tuple[str, int]]:
    """(switch, estimated peak) the plan's "would fit with" line names for a stage that does
    not fit: every single switch that fits, else the switches together; none when it fits."""
    if stage.peak <= ctx.device_memory:
        return []
    fitting = [(s.switch, s.peak) for s in suggestions(stage, ctx) if s.fits]
    if fitting:
        return fitting
    combined = together(stage, ctx)
    return [(combined.switch, combined.peak)] if combined else []


def check_switches(
    stages: list[StagePlan],
    ctx: Context,
    replan: Callable[[str, list[str]], StagePlan],
) -> dict[str, list[Check]]:
    """Stage name -> its named switches, each compiled by `replan(stage name, overrides)`
    (the stage alone, planned with the user's overrides and then these)."""
    out: dict[str, list[Check]] = {}
    for stage in stages:
        checks = []
        for switch, estimated in switches_to_check(stage, ctx):
            try:
                peak = replan(stage.name, switch.split()).peak
            except RlhfJaxError as e:  # e.g. a batch the switch no longer divides
                checks.append(Check(switch, estimated, None, False, str(e)))
                continue
            checks.append(Check(switch, estimated, peak, peak <= ctx.device_memory))
        if checks:
            out[stage.name] = checks
    return out
