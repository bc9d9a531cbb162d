"""One stage's checkpoints: resume from the newest, save on schedule, stop cleanly on request.

A stage stops early (saving first) when SIGTERM/SIGINT arrived or `checkpoint.stop_after`
steps were taken this session; it raises `StagePaused`, which the CLI turns into exit 0 with
a message. Rerunning the same command restores the newest checkpoint of each stage: the
weights, optimizer state, beta and EMA from the checkpoint, the data position and PRNG keys
from the step number (every batch and key is a pure function of seed and step), so a resumed
run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_jax.checkpointing import Checkpointer, abstract_state, preemption_requested
from rlhf_jax.config import CheckpointConfig


class StagePaused(Exception):
    """A stage stopped early after saving a checkpoint; rerun the command to continue."""

    def __init__(self, stage: str, step: int, directory: Path):
        super().__init__(
            f"{stage} stopped at step {step}; checkpoint in {directory}. Run the same command "
            "again to continue."
        )
        self.stage, self.step = stage, step


class StageCheckpoints:
    def __init__(self, out_dir: str | Path, stage: str, cfg: CheckpointConfig):
        self.stage, self.cfg = stage, cfg
        self.directory = Path(out_dir) / "checkpoints" / stage
        self.ckpt = Checkpointer(self.directory, cfg.save_every, max(cfg.keep, 1), cfg.async_save)
        self.start = 0
        self._closed = False

    def restore(self, state, shardings):
        """(state, first step to run): the newest checkpoint, or `state` and 0."""
        if not self.cfg.resume or self.ckpt.latest_step() is None:
            return state, 0
        restored, meta = self.ckpt.restore(
            target=abstract_state(state, shardings), expect={"stage": self.stage}
        )
        self.start = int(meta["step"])
        return restored, self.start

    def due(self, step: int, n_steps: int) -> bool:
        """Whether `after_step(step)` will save on schedule (preemption aside)."""
        return self.ckpt.should_save(step) or step == n_steps

    def after_step(self, step: int, state, n_steps: int) -> None:
        """Save when due; at the end of the stage; or save and raise StagePaused on a stop."""
        # all_processes: a signal to any process stops every process at the same step (a
        # collective, so it is asked at every step everywhere; free in single-process runs).
        stop = preemption_requested(all_processes=True) or (
            self.cfg.stop_after > 0 and step - self.start >= self.cfg.stop_after and step < n_steps
        )
        self.ckpt.save(
            step, state, {"stage": self.stage, "step": step}, force=stop or step == n_steps
        )
        if stop:
            self.close()
            raise StagePaused(self.stage, step, self.directory)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step (waits for an async save), or None."""
        self.ckpt.wait()
        return self.ckpt.latest_step()

    def close(self) -> None:
        """Wait for the last save and stop orbax's threads (a second call does nothing)."""
        if not self._closed:
            self._closed = True
            self.ckpt.close()
