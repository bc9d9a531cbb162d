"""Progress of long work: a tqdm bar on a terminal, periodic plain lines anywhere else.

A bar redraws itself with carriage returns several times a second; written to a log file or a
scheduler's output it becomes thousands of `\\r` updates on one line. When the stream is not a
terminal, `PlainProgress` prints one line at each tenth of the work and at least every
`every_seconds`, with the rate and the time left, and a last line when the work ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from tqdm.auto import tqdm

EVERY_SECONDS = 30.0


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int, desc: str, enabled: bool = True, initial: int = 0, stream: TextIO | None = None
):
    """A tqdm bar when `stream` (default stderr) is a terminal, else a `PlainProgress`; a
    silent bar when not `enabled`. `initial`: work already done (a resumed run), counted in
    the position but not in the rate."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, desc=desc, disable=True)
    if is_terminal(stream):
        return tqdm(
            total=total, desc=desc, initial=initial, file=stream, dynamic_ncols=True, leave=True
        )
    return PlainProgress(total, desc, initial=initial, stream=stream)


def _interval(seconds: float) -> str:
    return tqdm.format_interval(round(seconds))


class PlainProgress:
    """tqdm's `update` / `set_postfix` / `close` as whole lines, e.g.
    `sft: 300/1000 (30%) 0.52 s/it, 6:04 left, loss=2.31`.

    A line is printed when the count crosses a tenth of `total`, or when `every_seconds` have
    passed since the last line; `close` prints `sft: done 1000/1000 in 8:40 (0.52 s/it)` (or
    `stopped at` when the work ended early). At most ~10 + duration / every_seconds lines.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        stream: TextIO | None = None,
        every_seconds: float = EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.n, self.initial = total, desc, initial, initial
        self.stream = sys.stderr if stream is None else stream
        self.every_seconds, self.clock = every_seconds, clock
        self.start = self.last_line = clock()
        self.tenth = self._tenth()
        self.postfix = ""
        self.closed = False

    def _tenth(self) -> int:
        return 10 * self.n // self.total if self.total > 0 else 0

    def _rate(self, now: float) -> str:
        done = self.n - self.initial
        if done <= 0 or now <= self.start:
            return "? s/it"
        per = (now - self.start) / done
        return f"{per:.3g} s/it" if per >= 1 else f"{1 / per:.3g} it/s"

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        tenth = self._tenth()
        if self.n >= self.total:  # the last line comes from close()
            return
        if tenth > self.tenth or now - self.last_line >= self.every_seconds:
            self.tenth, self.last_line = tenth, now
            self._write(self._line(now))

    def _line(self, now: float) -> str:
        done = self.n - self.initial
        text = f"{self.desc}: {self.n}/{self.total} ({100 * self.n // max(self.total, 1)}%) "
        text += self._rate(now)
        if done > 0:
            left = (now - self.start) / done * (self.total - self.n)
            text += f", {_interval(left)} left"
        return text + (f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        elapsed, rate = _interval(now - self.start), self._rate(now)
        if self.n >= self.total:
            text = f"{self.desc}: done {self.n}/{self.total} in {elapsed} ({rate})"
        else:
            text = f"{self.desc}: stopped at {self.n}/{self.total} after {elapsed} ({rate})"
        self._write(text + (f", {self.postfix}" if self.postfix else ""))

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
