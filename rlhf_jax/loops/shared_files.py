"""Files a run generates and every process then reads (the built-in task's data files).

Only process 0 writes, into a temporary file beside the target that is renamed onto it once
complete (a rename within one folder is atomic on POSIX), and every process waits at a
barrier before reading. Without this a second process could read a file the first was still
writing: a 2-process pipeline once failed with `data/pretrain.jsonl:2210: malformed JSON:
Unterminated string`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import jax

from rlhf_jax import processes
from rlhf_jax.storage import is_url


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        processes.arrive(f"wrote {name}")


def write_jsonl_once(
    path: Path,
    rows: Iterable[dict],
    *,
    is_writer: bool | None = None,
    barrier: Callable[[str], None] = _barrier,
) -> Path:
    """Write `rows` as JSONL to `path` from process 0 only, atomically, then wait until every
    process has reached this point; returns `path`, complete on every process.
    is_writer / barrier: this process's role and the barrier (default: process 0, and JAX's
    barrier over all processes); a test can pass its own."""
    if is_writer is None:
        is_writer = jax.process_index() == 0
    if is_writer and is_url(path):
        # A bucket has no rename, and needs none: an object becomes visible only once its
        # upload is complete, so no reader can see half of it.
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
    elif is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer, so a stale temporary file of a killed run is simply replaced.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    barrier(str(path))
    return path
