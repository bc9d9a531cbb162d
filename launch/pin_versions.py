#!/usr/bin/env python3
"""Write launch/tested-versions.txt: the exact version of every package rlhf_jax needs at run
time (its dependencies and theirs), as installed in the environment the tests passed in; and
launch/constraints.txt, the pod's: those versions plus the pod-only packages.

    python launch/pin_versions.py      # after the test suite passed; commit both files

The test command in README.md installs with `-c launch/tested-versions.txt`, so CI tests
exactly these versions and a release on the package index cannot change what the suite runs
on. To move to newer versions: install without the constraints, run the suite, rerun this
script, commit.

The pod launcher installs with `pip install -c launch/constraints.txt`, so every worker, at
every launch and every restart after a preemption, runs the versions that were tested, not
whatever the package index holds that day. The TPU extras (jax[tpu] pins its libtpu itself)
and the gs:// filesystem come after, in POD_ONLY: they are not installed on the CPU test
machine, whose tests use a fake bucket.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

OUT = Path(__file__).with_name("constraints.txt")
TESTED = Path(__file__).with_name("tested-versions.txt")
# gcsfs pins the fsspec of its own release; this pair is what a pod needs for gs://.
POD_ONLY = {"gcsfs": "2026.10.1", "fsspec": "2026.10.1"}


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def runtime_closure(root: str = "rlhf_jax") -> dict[str, str]:
    """{package: installed version} of `root`'s run-time dependencies, transitively (no
    extras: the test and bench extras are not installed on a pod)."""
    seen: dict[str, str] = {}
    todo = [Requirement(r) for r in metadata.requires(root) or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _name(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # a dependency for another platform
        seen[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or []]
    return seen


def main() -> None:
    pins = runtime_closure()
    tested = [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in POD_ONLY]
    TESTED.write_text(
        "# Written by launch/pin_versions.py from the environment the tests passed in;\n"
        "# the README's test command installs with `pip install -c` this file.\n"
        + "\n".join(tested)
        + "\n"
    )
    lines = [
        "# Written by launch/pin_versions.py; the pod launcher installs with `pip install -c`",
        "# this file: the versions the tests passed with, then the pod-only packages.",
        f"-c {TESTED.name}",
        "# pod-only (not on the CPU test machine, which uses a fake bucket): gs:// support",
        *(f"{n}=={v}" for n, v in sorted(POD_ONLY.items())),
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {TESTED} ({len(tested)} pins) and {OUT}")


if __name__ == "__main__":
    main()
