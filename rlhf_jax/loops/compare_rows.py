"""What `rlhf-jax compare` learns about each row while training it (wall time, peak device
memory, skipped updates), kept in OUT/compare_rows.json across sessions.

A rerun restores each finished row from its checkpoint without a training step, and a row
stopped half-way (SIGTERM, checkpoint.stop_after) trains only its remaining steps: the
logger of the rerun saw none or part of each row's training. The report is written from
these facts, so that it describes every row whole, whichever session trained it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.report import training_summary, write_json


class RowFacts:
    def __init__(self, path: Path, logger: MetricsLogger):
        self.path, self.logger = path, logger
        try:
            self.rows: dict[str, dict] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.rows = {}

    @contextlib.contextmanager
    def training(self, name: str, stage: str) -> Iterator[None]:
        """Around a row's training: add this session's time (when it trained any step, or
        the row is new) and its peak memory to the row's facts, also when the stage stops
        early, and save them."""
        t0 = time.time()
        try:
            yield
        finally:
            logged = self.logger.history.get(stage) or []
            row = self.rows.setdefault(name, {"wall_seconds": 0.0, "peak_device_mib": None})
            if logged or row["wall_seconds"] == 0.0:
                row["wall_seconds"] += time.time() - t0
            peaks = [r["perf/peak_device_mib"] for r in logged if "perf/peak_device_mib" in r]
            if peaks:
                row["peak_device_mib"] = max([row["peak_device_mib"] or 0.0, *peaks])
            if logged:
                skipped = {
                    k: int(v) for k, v in logged[-1].items() if k.endswith("skipped_updates")
                }
                row["stage"], row["skipped_updates"] = stage, skipped
            if jax.process_index() == 0:
                write_json(self.path, self.rows)

    def of(self, name: str) -> dict:
        """`wall_seconds` and `peak_device_mib` of a row over every session that trained it."""
        row = self.rows[name]
        return {"wall_seconds": row["wall_seconds"], "peak_device_mib": row["peak_device_mib"]}

    def training_summary(self) -> dict:
        """`training_summary` of the logger, with the skipped updates of rows trained in
        earlier sessions."""
        summary = training_summary(self.logger)
        earlier = {r["stage"]: r["skipped_updates"] for r in self.rows.values() if "stage" in r}
        summary["skipped_updates"] = {**earlier, **summary["skipped_updates"]}
        return summary
