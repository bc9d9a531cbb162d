"""Preemption: SIGTERM / SIGINT only set a flag; the loop saves and exits at the next step
boundary (nothing is saved from inside a signal handler)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable

import jax
import numpy as np

_REQUESTED = threading.Event()


def install_preemption_handler(
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> Callable[[], None]:
    """Make `signals` request a stop (see `preemption_requested`) instead of ending the
    process; a second SIGINT interrupts at once (KeyboardInterrupt), for an impatient Ctrl-C.
    Call from the main thread. Returns a function that puts the previous handlers back."""

    def handler(signum, frame):
        if signum == signal.SIGINT and _REQUESTED.is_set():
            raise KeyboardInterrupt
        _REQUESTED.set()

    previous = {s: signal.signal(s, handler) for s in signals}

    def uninstall() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return uninstall


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
