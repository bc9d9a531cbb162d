"""Preemption: SIGTERM / SIGINT / SIGHUP only set a flag; the loop saves and exits at the next
step boundary (nothing is saved from inside a signal handler).

SIGHUP is what a process gets when its terminal or SSH session closes: without a handler it
ends the process with nothing saved. It is treated like SIGTERM, except in a process started
with SIGHUP ignored (`nohup`), which asked to outlive its terminal and keeps running. A hung-up
terminal fails every write with EIO, so the handler also points the standard streams that
were a terminal at /dev/null: the progress bar and the final message cannot end the run
before it saves."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable

import jax
import numpy as np

_REQUESTED = threading.Event()


def _detach_from_terminal(fds: list[int]) -> None:
    """Point `fds` (standard streams that were a terminal) at /dev/null."""
    for stream in (sys.stdout, sys.stderr):
        # What is buffered goes to the dead terminal: if that fails, drop it, not the run
        # (RuntimeError: the signal came in the middle of a write to the stream).
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            stream.flush()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)


def install_preemption_handler(
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
    second_interrupt: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """Make `signals` request a stop (see `preemption_requested`) instead of ending the
    process; a second SIGINT interrupts at once, for an impatient Ctrl-C: it calls
    `second_interrupt` (default: raise KeyboardInterrupt). A signal the process started with
    ignored (SIGHUP under `nohup`) stays ignored. Call from the main thread. Returns a
    function that puts the previous handlers back."""
    terminals = [fd for fd in (0, 1, 2) if _is_terminal(fd)]  # a hung-up one no longer says

    def handler(signum, frame):
        if signum == signal.SIGINT and _REQUESTED.is_set():
            if second_interrupt is None:
                raise KeyboardInterrupt
            second_interrupt()
            return
        if signum == signal.SIGHUP and terminals:
            _detach_from_terminal(terminals)
            terminals.clear()
        if not _REQUESTED.is_set():
            _announce(signum)
        _REQUESTED.set()

    previous = {}
    for s in signals:
        if s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN:
            continue  # nohup: the user asked this process to outlive its terminal
        previous[s] = signal.signal(s, handler)

    def uninstall() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return uninstall


def _announce(signum: int) -> None:
    """Say at once that the signal was heard: the save waits for the step in flight, which
    can take minutes at real sizes, and a silent first Ctrl-C invites a kill -9."""
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    again = " (Ctrl-C again to stop at once without saving)" if signum == signal.SIGINT else ""
    line = f"{name}: stopping after the step in flight; saving first{again}\n"
    with contextlib.suppress(OSError):  # not print: a handler must not re-enter a buffer
        os.write(2, line.encode())


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def preemption_requested(all_processes: bool = False) -> bool:
    """True once a handled signal arrived. all_processes: True on every process when any
    process got one; a collective, so every process must call it at the same step."""
    flag = _REQUESTED.is_set()
    if all_processes and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def clear_preemption() -> None:
    """Forget a request (e.g. after the save it asked for, when the run goes on)."""
    _REQUESTED.clear()
