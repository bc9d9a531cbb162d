"""Stop a run that keeps producing non-finite gradients, with the reason and what is kept.

Each optimizer skips an update whose gradients (or result) hold a NaN/Inf (`skip_non_finite`),
so the weights never take a bad step; the steps report how many were skipped in all and in a row.
`SkipGuard` reads those counts on the host: every new skip is logged as a warning, and
`limit` skips in a row raise `TrainingDiverged` (exit code 2 from the CLI) before anything is
saved, so the newest checkpoint on disk is one written before the trouble.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.logging import MetricsLogger


def _which(prefix: str) -> str:
    """Names the optimizer in messages when a stage has several (PPO's policy and value)."""
    return "" if prefix == "train" else f" ({prefix})"


class TrainingDiverged(RlhfJaxError):
    """Too many consecutive updates had non-finite gradients."""


class SkipGuard:
    """Watch `{prefix: limit}` counters `<prefix>/skipped_updates` and `<prefix>/consecutive_skips`.

    `check(step, metrics)` pulls only those scalars to the host. The train loop calls it one
    step late (after dispatching the next step), so the device is never left idle waiting.
    """

    def __init__(
        self,
        stage: str,
        limits: dict[str, int],
        logger: MetricsLogger,
        checkpoint_step: Any = None,
    ):
        self.stage, self.limits, self.logger = stage, limits, logger
        self.checkpoint_step = checkpoint_step  # () -> newest saved step or None
        self.total = dict.fromkeys(limits, 0)

    def counters(self, metrics: dict) -> dict[str, Any]:
        """The device scalars `check` needs (keep these, drop the rest of the metrics)."""
        return {
            k: metrics[k]
            for prefix in self.limits
            for k in (f"{prefix}/skipped_updates", f"{prefix}/consecutive_skips")
            if k in metrics
        }

    def check(self, step: int, counters: dict) -> None:
        host = {k: int(np.asarray(v)) for k, v in jax.device_get(counters).items()}
        for prefix, limit in self.limits.items():
            total = host.get(f"{prefix}/skipped_updates", 0)
            in_a_row = host.get(f"{prefix}/consecutive_skips", 0)
            if total > self.total[prefix]:
                self.logger.warn(
                    f"{self.stage} step {step}{_which(prefix)}: non-finite gradients, "
                    f"{total - self.total[prefix]} update(s) skipped "
                    f"({in_a_row} in a row, {total} in all)"
                )
                self.total[prefix] = total
            if in_a_row >= limit:
                raise TrainingDiverged(self._stop_message(step, prefix, in_a_row, limit))

    def _stop_message(self, step: int, prefix: str, in_a_row: int, limit: int) -> str:
        saved = self.checkpoint_step() if self.checkpoint_step is not None else None
        kept = (
            f"the newest checkpoint (step {saved}) is intact; rerunning resumes from it"
            if saved is not None
            else "no checkpoint of this stage was saved (checkpoint.save_every=0)"
        )
        return (
            f"{self.stage} stopped at step {step}: {in_a_row} updates in a row had NaN/Inf "
            f"gradients{_which(prefix)} (limit: "
            f"max_consecutive_skips={limit}). The weights never took those updates; {kept}. "
            "Lower the learning rate, check the data, or raise the limit."
        )

    def require_learning(self, states: dict[str, Any]) -> None:
        """End of a stage: if every update one of `states` ({prefix: TrainState}) took was
        skipped, nothing was learned, and saving the unchanged weights as a result would
        pass an untrained model off as a trained one: raise TrainingDiverged instead."""
        for prefix, state in states.items():
            opt = state.opt_state
            if not hasattr(opt, "notfinite_count"):
                continue
            taken, skipped = jax.device_get((state.step, opt.notfinite_count))
            if int(taken) > 0 and int(skipped) >= int(taken):
                raise TrainingDiverged(
                    f"{self.stage}: every one of its {int(taken)} updates{_which(prefix)} had "
                    "NaN/Inf gradients and was skipped, so nothing was learned and no model is "
                    "saved. Check the data and the model (token ids beyond the vocabulary, "
                    "sequences beyond the position table) and the learning rate."
                )
