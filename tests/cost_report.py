"""`pytest -p tests.cost_report -p no:xdist FILES`: what each test file costs, in CPU seconds
rather than wall time (the machine is shared, so wall time says more about the neighbours).

Per file it prints the CPU seconds of the pytest process and of the subprocesses it waited for
(user + sys), the XLA programs this process asked for and how many of them came from the
persistent compilation cache (tests/conftest.py), and how many entries the cache gained: every
program compiled afresh by this process *or its subprocesses*. A diagnostic, not a test.
"""

from __future__ import annotations

import os
import resource
import sys
from collections import Counter, defaultdict
from pathlib import Path

_COMPILE = "/jax/core/compile/backend_compile_duration"  # every program jit asks XLA for
_HIT = "/jax/compilation_cache/cache_hits"

_events: Counter[str] = Counter()
_rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
_listening = False


def _listen() -> None:
    global _listening
    if _listening or "jax" not in sys.modules:
        return
    from jax import monitoring

    monitoring.register_event_listener(lambda event, **_: _events.update([event]))
    monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_: _events.update([event])
    )
    _listening = True


def _cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _cache_entries() -> int:
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not folder or not Path(folder).is_dir():
        return 0
    return sum(1 for p in Path(folder).iterdir() if p.name.endswith("-cache"))


def _sample() -> tuple[float, float, int, int, int]:
    _listen()
    own, kids = _cpu()
    return own, kids, _events[_COMPILE], _events[_HIT], _cache_entries()


def _add(file: str, before, after) -> None:
    row = _rows[file]
    for name, b, a in zip(("cpu_s", "sub_cpu_s", "programs", "hits", "new_entries"), before, after):
        row[name] += a - b


def pytest_runtest_protocol(item, nextitem):
    # Fixtures set up here (a session fixture's run included) count to the file that first
    # needs them, as they would in a run of that file alone.
    item._cost_before = _sample()


def pytest_runtest_makereport(item, call):
    if call.when == "teardown" and hasattr(item, "_cost_before"):
        _add(item.nodeid.split("::")[0], item._cost_before, _sample())


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.write_sep("=", "cost per test file (CPU seconds; XLA programs)")
    tr.write_line(
        f"{'file':60} {'cpu_s':>7} {'sub_cpu_s':>9} {'programs':>8} {'hits':>5} {'new_entries':>11}"
    )
    total = defaultdict(float)
    for file, row in sorted(_rows.items(), key=lambda kv: -(kv[1]["cpu_s"] + kv[1]["sub_cpu_s"])):
        tr.write_line(
            f"{file:60} {row['cpu_s']:7.1f} {row['sub_cpu_s']:9.1f} {int(row['programs']):8d} "
            f"{int(row['hits']):5d} {int(row['new_entries']):11d}"
        )
        for k, v in row.items():
            total[k] += v
    tr.write_line(
        f"{'total':60} {total['cpu_s']:7.1f} {total['sub_cpu_s']:9.1f} "
        f"{int(total['programs']):8d} {int(total['hits']):5d} {int(total['new_entries']):11d}"
    )
