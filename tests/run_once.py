"""Work done once per pytest run, shared by the xdist workers (a session fixture alone runs
once per worker)."""

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build(folder)` once per pytest run even under xdist (a
    session fixture alone runs once per worker): the first worker to ask builds it holding a
    file lock, the others wait on the lock and then read what it built. Readers must not
    change it. A build that fails leaves no mark, so the next one to ask fails the same way
    instead of reading half a folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's temporary folder, shared by its workers
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
