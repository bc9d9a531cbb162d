"""One run at a time per output folder.

Two commands writing the same `--output` would leave one run's weights beside the other's
settings and both runs' checkpoints. Every command that writes an output folder takes an OS
lock on `OUTPUT/.rlhf-jax.lock` (`fcntl.flock`) when it creates the folder and holds it until
the command ends; the file says who holds it (host, pid, command, start time). A second run
is refused with `OutputInUse` (exit 2) naming that holder.

The kernel drops a flock when its process dies, however it dies (SIGKILL, a crash, power
loss on the host), so a lock file left behind never blocks the next run: rerunning after
`kill -9` resumes as before. The file itself stays in the folder (removing a lock file is
what lets two runs each lock a different file of the same name).

In a multi-process run (jax.distributed) every process shares the folder: only process 0
locks it, and tells the others whether it could, so every process of a refused run stops
with the same error instead of waiting for a process 0 that has left.

A bucket URL cannot be locked: an object store has no lock a dead holder drops, and a lock
object left by a preempted run would block the restart that should resume it. For a URL
output, process 0 writes its holder record to `OUTPUT/.rlhf-jax.lock` all the same and prints
a warning on stderr that the folder is not locked, naming the holder record it found there
(if any), so two runs on one URL are at least visible. The record is removed when the
command ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.storage import output_path

LOCK_FILE = ".rlhf-jax.lock"

_HELD: dict[Path, int] = {}  # resolved folder -> open, flocked fd (this process holds it)
_BUCKET_RECORDS: list = []  # holder records this process wrote at URL outputs (epath)


class OutputInUse(RlhfJaxError):
    """Another live run holds the output folder's lock."""


def _command() -> str:
    """This process's command line as the user typed it (`rlhf-jax sft ...`)."""
    argv = sys.argv or [""]
    if Path(argv[0]).name in ("rlhf-jax", "cli.py"):
        return shlex.join(["rlhf-jax", *argv[1:]])
    return shlex.join(argv)


def _holder_record() -> bytes:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": _command()}
    return (json.dumps({**record, "started": started}) + "\n").encode()


def describe_holder(folder: Path) -> str:
    """Who holds `folder`'s lock, as its lock file says (best effort: the holder writes the
    file just after locking it, so a reader may find it still empty)."""
    try:
        record = json.loads((folder / LOCK_FILE).read_text())
        return (
            f"pid {record['pid']} on host {record['host']}, started {record['started']}: "
            f"{record['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return f"a process that has not said who it is yet (see {folder / LOCK_FILE})"


def _try_lock(folder: Path) -> int | None:
    """An fd holding the folder's lock with this process's record in it, or None if busy."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_record(), 0)
    return fd


def lock_output(folder: str | Path) -> None:
    """Hold `folder`'s lock until `release_output_locks()` or the process ends; a second call
    for the same folder does nothing. Every process of a multi-process run must call this
    at the same point (process 0 locks, then tells the others). Raises OutputInUse while
    another run holds it."""
    import jax  # here: the CLI imports this module for `release_output_locks`, and `plan`
    import numpy as np  # must start without JAX

    folder = output_path(folder)
    if not isinstance(folder, Path):
        _record_bucket_holder(folder)
        return
    key = folder.resolve()
    if key in _HELD:
        return
    fd, problem = None, None
    if jax.process_index() == 0:
        try:
            fd = _try_lock(folder)
        except OSError as e:
            problem = f"cannot lock output folder {folder} ({e.strerror or e})"
    status = 0 if fd is not None else (1 if problem is None else 2)
    if jax.process_count() > 1:
        from rlhf_jax import processes

        status = int(processes.broadcast_from_first(np.int32(status), "output lock"))
    if status == 0:
        if fd is not None:
            _HELD[key] = fd
        return
    if status == 2:
        raise RlhfJaxError(problem or f"process 0 could not lock output folder {folder}")
    raise OutputInUse(
        f"output folder {folder} is in use by another run ({describe_holder(folder)}); wait "
        "for it to end or choose another --output"
    )


def _record_bucket_holder(folder) -> None:
    """A URL output: the holder record and a warning instead of a lock (see the module)."""
    import jax

    if jax.process_index() != 0 or os.fspath(folder) in _BUCKET_RECORDS:
        return
    record = folder / LOCK_FILE
    found = ""
    with contextlib.suppress(OSError, ValueError):
        if record.exists() and record.read_text().strip():
            found = f"; its last holder record says {describe_holder(folder)}"
    print(
        f"warning: output {folder} is a URL and cannot be locked against another run; make "
        f"sure no other run writes it{found}",
        file=sys.stderr,
        flush=True,
    )
    record.write_bytes(_holder_record())
    _BUCKET_RECORDS.append(record)


def release_output_locks() -> None:
    """Let other runs use the folders this process locked (the CLI calls this as a command
    ends; a Python caller of the `run_*` commands may too, else the process's end does)."""
    while _BUCKET_RECORDS:
        with contextlib.suppress(OSError):
            _BUCKET_RECORDS.pop().unlink()  # no stale holder record for the next reader
    while _HELD:
        _, fd = _HELD.popitem()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale holder record for the next reader
        os.close(fd)  # drops the flock
