"""Metrics to a JSONL file (and optionally TensorBoard and Weights & Biases), progress for
long work (`loops/progress.py`). The one host loop (`loops/train.py`) is the one caller of
`MetricsLogger.log`.

Only process 0 writes; every process may call these methods.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.progress import progress_bar


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


def prepare_output_dir(
    path: str | Path,
    inputs: dict[str, str | None] | None = None,
    writes: tuple[str, ...] = (),
) -> Path:
    """Create the run's output folder and prove it is writable, before any work is done.

    `inputs`: config key -> a model folder the run reads; `writes`: the subfolders of the
    output the run writes (`sft`, `policy`, ...). An output that is, or would write into, an
    input folder is refused: the run would overwrite the model it reads.
    """
    out = Path(path)
    targets = {out.resolve(): "--output"}
    targets.update({(out / w).resolve(): f"--output/{w}" for w in writes})
    for key, folder in (inputs or {}).items():
        if folder is None:
            continue
        hit = targets.get(Path(folder).resolve())
        if hit is not None:
            raise RlhfJaxError(
                f"{hit} is the folder of config key '{key}' ({folder}): the run would overwrite "
                "the model it reads; choose another --output"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{jax.process_index()}-{os.getpid()}"  # unique per process
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RlhfJaxError(
            f"output folder {out} cannot be written ({e.strerror or e}); choose another --output"
        ) from None
    return out


RUN_CONFIG = "run_config.json"  # not config.json: that name is a Hugging Face model's


def write_run_config(out: Path, config_dict: dict) -> Path:
    """The resolved config of the run, beside its outputs (process 0 writes it)."""
    path = out / RUN_CONFIG
    if jax.process_index() == 0:
        path.write_text(json.dumps(config_dict, indent=2) + "\n")
    return path


def _drop_partial_last_line(path: Path, block: int = 1 << 16) -> None:
    """A run killed (SIGKILL, power loss) while writing a line leaves it half-written; cut it
    so the resumed run's lines start on a line of their own and every line parses. Lines of
    steps after the newest checkpoint are written again by the resumed run (the later line of
    a step is the one that counts). Reads only the file's tail, however long the file."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return  # complete
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)  # one partial line and nothing else


def _start_wandb(out_dir: Path, init_kwargs: dict[str, Any]):
    """A W&B run writing under OUTPUT/wandb (online, or offline with WANDB_MODE=offline)."""
    try:
        import wandb
    except ImportError:
        raise RlhfJaxError(
            "log.wandb=true needs the wandb package: pip install 'rlhf-jax[wandb]'"
        ) from None
    return wandb.init(dir=str(out_dir), **init_kwargs)


class MetricsLogger:
    """Appends `{"stage", "step", "time", <metric>: value}` lines to `metrics.jsonl`."""

    def __init__(
        self,
        out_dir: str | Path,
        tensorboard: bool = False,
        progress: bool = True,
        wandb: dict[str, Any] | None = None,
    ):
        """`wandb`: keyword arguments of `wandb.init` (project, name, config), or None."""
        self.out_dir = Path(out_dir)
        self.is_writer = jax.process_index() == 0
        self.progress = progress and self.is_writer
        self.history: dict[str, list[dict[str, float]]] = {}
        self.warnings: list[str] = []
        self._start = time.time()
        self._file = None
        self._tb = None
        self._wandb = None
        self._wandb_stages: set[str] = set()
        if self.is_writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "metrics.jsonl"
            _drop_partial_last_line(path)
            self._file = path.open("a", encoding="utf-8")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                except ImportError:
                    raise RlhfJaxError(
                        "log.tensorboard=true needs tensorboardX: pip install tensorboardX"
                    ) from None
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            if wandb is not None:
                self._wandb = _start_wandb(self.out_dir, wandb)

    @classmethod
    def from_config(cls, out_dir: str | Path, log, run_config: dict | None = None):
        """The logger the `log` config section asks for (`run_config` goes to W&B)."""
        wandb = None
        if log.wandb:
            wandb = {"project": log.wandb_project, "name": log.wandb_name, "config": run_config}
        return cls(out_dir, log.tensorboard, log.progress, wandb)

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Record one step's metrics (pulls them to the host: call every `log.every` steps)."""
        row = {k: _to_float(v) for k, v in jax.device_get(metrics).items()}
        self.history.setdefault(stage, []).append({"step": step, **row})
        if self._file is not None:
            line = {"stage": stage, "step": step, "time": round(time.time() - self._start, 3)}
            self._file.write(json.dumps({**line, **row}) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                self._tb.add_scalar(f"{stage}/{key}", value, step)
        if self._wandb is not None:
            if stage not in self._wandb_stages:  # each stage counts its own steps from 1
                self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self._wandb_stages.add(stage)
            self._wandb.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in row.items()}})
        return row

    def warn(self, message: str) -> None:
        """A warning line on stderr (process 0), kept in `warnings` for the run's summary."""
        self.warnings.append(message)
        if self.is_writer:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def bar(self, total: int, desc: str, initial: int = 0):
        """A progress bar on stderr: tqdm's on a terminal, periodic plain lines otherwise (a
        silent one on other processes or when disabled). `initial`: steps done before a
        resume."""
        return progress_bar(total, desc, enabled=self.progress, initial=initial)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
