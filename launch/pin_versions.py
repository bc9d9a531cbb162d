#!/usr/bin/env python3
"""Write launch/tested-versions.txt: the exact version of every package rlhf_jax needs at run
time and of every package its tests need (the `test` extra: pytest, ruff, the PyTorch, TRL,
PEFT and W&B references), with their dependencies, as installed in the environment the tests
passed in; and launch/constraints.txt, the pod's: those versions plus the pod-only packages.

    python launch/pin_versions.py      # after the test suite passed; commit both files

The test command in README.md installs with `-c launch/tested-versions.txt`, so CI tests
exactly these versions and a release on the package index cannot change what the suite runs
on, neither a run-time library nor a test tool (pytest, ruff, the references). To move to
newer versions: install without the constraints, run the suite, rerun this script, commit.

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


def _version(dist: metadata.Distribution) -> str:
    # PyTorch's CPU wheel reports 2.13.0+cpu; `==2.13.0` matches it and is what pyproject says
    return dist.version.split("+")[0]


def _needed(requires: list[str] | None, extras: tuple[str, ...]) -> list[Requirement]:
    """The requirements that apply here with one of `extras` asked for ("" = none)."""
    reqs = [Requirement(r) for r in requires or []]
    return [
        r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)
    ]


def runtime_closure(root: str = "rlhf_jax", extras: tuple[str, ...] = ()) -> dict[str, str]:
    """{package: installed version} of `root`'s dependencies, transitively: the run-time ones,
    plus those of `extras`, and of every extra a requirement names (`etils[epath]`)."""
    seen: dict[str, str] = {}
    followed: set[tuple[str, str]] = set()  # (package, extra) whose requirements are queued
    todo = _needed(metadata.requires(root), ("", *extras))
    while todo:
        req = todo.pop()
        name = _name(req.name)
        wanted = {(name, e) for e in ("", *req.extras)}
        if wanted <= followed:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # a dependency for another platform
        seen[name] = _version(dist)
        new_extras = tuple(e for n, e in wanted - followed)
        followed |= wanted
        todo += _needed(dist.requires, new_extras)
    return seen


def main() -> None:
    pins = runtime_closure(extras=("test",))
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
