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

import jax

from rlhf_jax import processes
from rlhf_jax.checkpointing import Checkpointer, abstract_state, preemption_requested
from rlhf_jax.config import CheckpointConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.settings import differences
from rlhf_jax.steps.state import with_frozen_of, without_frozen
from rlhf_jax.storage import orbax_directory, output_path, remove_tree


class StagePaused(Exception):
    """A stage stopped early after saving a checkpoint; rerun the command to continue."""

    def __init__(self, stage: str, step: int, directory: Path):
        super().__init__(
            f"{stage} stopped at step {step}; checkpoint in {directory}. Run the same command "
            "again to continue."
        )
        self.stage, self.step = stage, step


class StageCheckpoints:
    """`settings` ({key: value}, see `loops.settings.stage_settings`): what shapes the stage;
    saved with every checkpoint. A checkpoint saved under other settings is not resumed: the
    error lists the differences and the two ways on (another --output, or
    `checkpoint.resume=false`, which starts the stage over and replaces its checkpoints)."""

    def __init__(
        self,
        out_dir: str | Path,
        stage: str,
        cfg: CheckpointConfig,
        settings: dict[str, str] | None = None,
    ):
        self.stage, self.cfg, self.settings = stage, cfg, settings
        self.directory = output_path(out_dir) / "checkpoints" / stage  # local, or a URL
        if not cfg.resume and self.directory.exists():
            if jax.process_index() == 0:
                n = sum(1 for p in self.directory.iterdir() if p.name.isdigit())
                remove_tree(self.directory)
                print(
                    f"{stage}: checkpoint.resume=false: starting over; {n} old checkpoint(s) "
                    f"removed from {self.directory}"
                )
            if jax.process_count() > 1:
                processes.arrive(f"fresh {stage}")
        self.ckpt = Checkpointer(
            orbax_directory(self.directory), cfg.save_every, max(cfg.keep, 1), cfg.async_save
        )
        self.start = 0
        self._closed = False

    def restore(self, state, shardings):
        """(state, first step to run): the newest checkpoint, or `state` and 0."""
        step = self.ckpt.latest_step() if self.cfg.resume else None
        if step is None:
            return state, 0
        try:
            self._check_settings(self.ckpt.read_meta(step))
            # Frozen weights (LoRA's base) are not in checkpoints: they come from the
            # model folder the stage loaded, as `state` holds them.
            restored, meta = self.ckpt.restore(
                target=abstract_state(without_frozen(state), without_frozen(shardings)),
                expect={"stage": self.stage},
            )
            restored = with_frozen_of(restored, state)
        except BaseException:
            self.close()  # no orbax thread left running behind the error
            raise
        self.start = int(meta["step"])
        if jax.process_index() == 0:
            print(f"{self.stage}: resuming from step {self.start} ({self.directory})")
        return restored, self.start

    def _check_settings(self, meta: dict) -> None:
        saved = meta.get("settings")
        if saved is None or self.settings is None:
            return  # written before settings were recorded, or a caller that records none
        changed = differences(saved, self.settings)
        if changed:
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise RlhfJaxError(
                f"{self.directory} holds {self.stage} checkpoints trained with other settings: "
                + "; ".join(changed[:6])
                + more
                + ". Resuming would continue (or reuse) that run. Choose another --output to "
                "keep both, or set checkpoint.resume=false to train this stage again from "
                "scratch (its old checkpoints are removed)"
            )

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
        meta = {"stage": self.stage, "step": step}
        if self.settings is not None:
            meta["settings"] = self.settings
        self.ckpt.save(step, without_frozen(state), meta, force=stop or step == n_steps)
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
