"""Metrics to a JSONL file (and optionally TensorBoard and Weights & Biases), progress for
long work (`loops/progress.py`). The one host loop (`loops/train.py`) is the one caller of
`MetricsLogger.log`.

Only process 0 writes; every process may call these methods.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.progress import progress_bar
from rlhf_jax.storage import output_path


def _to_float(value: Any) -> float:
    return float(np.asarray(value))


def _identity(path) -> str:
    """What two spellings of one folder share: the resolved path, or the URL without a
    trailing slash."""
    return str(path.resolve()) if isinstance(path, Path) else os.fspath(path).rstrip("/")


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
    out = output_path(path)
    targets = {_identity(out): "--output"}
    targets.update({_identity(out / w): f"--output/{w}" for w in writes})
    for key, folder in (inputs or {}).items():
        if folder is None:
            continue
        hit = targets.get(_identity(output_path(folder)))
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


def write_run_config(out, config_dict: dict):
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


class BucketFile:
    """A text file at a URL written like an appended local file: the object is rewritten
    whole (buckets have no append), on `flush` at most every INTERVAL_S seconds, and always
    on `close`. Lines already there (a resumed run's) are kept."""

    INTERVAL_S = 30.0

    def __init__(self, path):
        self.path = path
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if text and not text.endswith("\n"):  # never happens with whole-object writes; cheap
            text = text[: text.rfind("\n") + 1]
        self._parts = [text]
        self._written = time.monotonic()

    def write(self, text: str) -> None:
        self._parts.append(text)

    def flush(self, force: bool = False) -> None:
        if force or time.monotonic() - self._written >= self.INTERVAL_S:
            self.path.write_text("".join(self._parts), encoding="utf-8")
            self._written = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


def _start_wandb(out_dir: Path, init_kwargs: dict[str, Any]):
    """A W&B run writing under OUTPUT/wandb (online, or offline with WANDB_MODE=offline)."""
    try:
        import wandb
    except ImportError:
        raise RlhfJaxError(
            "log.wandb=true needs the wandb package: pip install 'rlhf-jax[wandb]'"
        ) from None
    # W&B stages its files in a local folder before sending them: a temporary one for a URL.
    local = out_dir if isinstance(out_dir, Path) else tempfile.mkdtemp(prefix="rlhf_jax-wandb-")
    return wandb.init(dir=str(local), **init_kwargs)


class MetricsLogger:
    """Appends `{"stage", "step", "time", <metric>: value}` lines to `metrics.jsonl`.

    At a bucket URL (which cannot append to an object) the file is rewritten whole, at most
    every `BucketFile.INTERVAL_S` seconds and when the logger closes (a stage that stops for
    preemption closes it after saving its checkpoint)."""

    def __init__(
        self,
        out_dir: str | Path,
        tensorboard: bool = False,
        progress: bool = True,
        wandb: dict[str, Any] | None = None,
    ):
        """`wandb`: keyword arguments of `wandb.init` (project, name, config), or None."""
        self.out_dir = output_path(out_dir)
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
            if isinstance(path, Path):
                _drop_partial_last_line(path)
                self._file = path.open("a", encoding="utf-8")
            else:
                self._file = BucketFile(path)
            if tensorboard and not isinstance(path, Path):
                raise RlhfJaxError(
                    f"log.tensorboard=true writes local event files; --output {self.out_dir} is "
                    "a URL: set log.tensorboard=false or use a local --output"
                )
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

    def sync(self) -> None:
        """Write every line logged so far to a URL output now (the loop calls this before
        each checkpoint, so a preempted run's metrics reach as far as its checkpoint). A
        local file is flushed at every line already."""
        if isinstance(self._file, BucketFile):
            self._file.flush(force=True)

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
