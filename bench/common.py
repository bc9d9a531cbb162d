"""What every benchmark shares: machine facts, interleaved timing, tables, BENCHMARKS.md.

Timing rules (the same for every script):
- each measured callable blocks until its result exists (`jax.block_until_ready`, or a
  PyTorch call that returns host data), so a time is the work, not its dispatch;
- the first call of each side is reported separately as compile/first-call time, then
  `warmup` more calls are discarded, then `repeats` calls are timed;
- in a comparison the sides alternate call by call (A B A B ...), so machine noise lands on
  both equally, and results are quoted as ratios of medians.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf_jax.host_memory import keep_freed_host_memory

# Before any backend starts. Both sides of a comparison run in this process under the same
# malloc settings: freed temporaries are reused rather than faulted in again at every step
# (rlhf_jax.host_memory); PyTorch's large buffers take the same path, so neither side gains.
HOST_MEMORY_KEPT = keep_freed_host_memory()

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "BENCHMARKS.md"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "trl", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def jax_device() -> str:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{jax.device_count()} x {d.platform} ({kind})"


def machine_lines() -> list[str]:
    mem = memory_gib()
    return [
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs"
        + (f", {mem:.0f} GiB RAM" if mem else ""),
        f"- JAX devices: {jax_device()}",
        "- host malloc: "
        + (
            "freed memory kept for reuse, both sides (`rlhf_jax.host_memory`)"
            if HOST_MEMORY_KEPT
            else "system default"
        ),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def blocked(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` followed by waiting for any JAX arrays it returned."""
    import jax

    def run():
        return jax.block_until_ready(fn())

    return run


@dataclasses.dataclass
class Timing:
    """Seconds of the first call (compile + run for JAX) and of each timed call."""

    first: float
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed calls: how noisy the measurement was."""
        return (max(self.times) - min(self.times)) / self.median if self.times else 0.0


def _clock(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(
    sides: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5
) -> dict[str, Timing]:
    """Time every side, interleaved call by call. Each callable must block until done."""
    first = {name: _clock(fn) for name, fn in sides.items()}
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            times[name].append(_clock(fn))
    return {name: Timing(first[name], times[name]) for name in sides}


def time_one(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Timing:
    return alternate({"x": fn}, warmup, repeats)["x"]


@dataclasses.dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([fmt(c) for c in cells])

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def fmt(x: object) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        if abs(x) >= 0.01:
            return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
        return f"{x:.2e}"
    return str(x)


def section(name: str, tables: Sequence[Table], command: str, extra: Sequence[str] = ()) -> str:
    """One BENCHMARKS.md section: machine, versions, command, then the tables."""
    parts = [f"<!-- bench:{name} -->"]
    for t in tables:
        parts.append(f"### {t.title}\n")
        parts.append(t.markdown())
        parts.extend(f"\n{n}" for n in t.notes)
        parts.append("")
    parts.append("Run with:\n")
    parts.append(f"```\n{command}\n```\n")
    parts.extend(machine_lines())
    parts.extend(extra)
    parts.append(f"<!-- /bench:{name} -->")
    return "\n".join(parts)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the `name` section of `path` (between its markers), or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    if pattern.search(old):
        new = pattern.sub(lambda _: text, old)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--size",
        choices=("tiny", "full"),
        default="full",
        help="tiny: a seconds-long smoke run of the harness (what the tests use)",
    )
    p.add_argument("--warmup", type=int, default=1, help="discarded calls after the first")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side (median)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="markdown file to update ('-' prints only)",
    )
    return p


def command_line() -> str:
    return " ".join(["python -m", f"bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def publish(name: str, tables: Sequence[Table], out: Path | str, extra: Sequence[str] = ()) -> str:
    """Print the section and write it into `out` (unless out is '-')."""
    text = section(name, tables, command_line().strip(), extra)
    print(text, flush=True)
    if str(out) != "-":
        write_section(Path(out), name, text)
    return text


def set_torch_threads() -> int:
    """PyTorch uses as many threads as the machine has cores (what the issue asks)."""
    import torch

    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
