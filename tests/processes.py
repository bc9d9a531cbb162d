"""Subprocesses in tests, with verdicts that do not depend on how busy the machine is.

A test waits for an event the process makes (a line it prints, a file it writes) before it
acts, never for a fixed number of seconds. The one clock is LIMIT_S: a guard against a hung
process, far beyond any loaded run (the whole suite took 70 min under 5x CPU
oversubscription, its longest subprocess a few minutes), never a verdict about speed.
RLHF_JAX_TEST_LIMIT_S overrides it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

LIMIT_S = float(os.environ.get("RLHF_JAX_TEST_LIMIT_S", "1800"))


def _tail(text: str | bytes | None, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run(cmd: Sequence[str], *, limit: float = LIMIT_S, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd)` with text output captured; past `limit` seconds the process is
    killed and the test fails as hung, with the end of what it wrote."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    try:
        return subprocess.run(cmd, timeout=limit, check=False, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"still running after {limit:.0f} s (hung?): {' '.join(map(str, cmd))[:300]}\n"
            f"{_tail(e.stderr)}"
        ) from None


class Process:
    """A started subprocess whose stdout and stderr are read line by line as they come (by
    threads, so a full pipe never stalls it), for a test to wait on a line or a file before it
    acts. As a context manager, it kills the process if the test leaves it running."""

    def __init__(self, cmd: Sequence[str], **popen_kwargs) -> None:
        self.cmd = [str(c) for c in cmd]
        self.popen = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            **popen_kwargs,
        )
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._readers = {
            name: threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))
        }
        for reader in self._readers.values():
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self._changed:
                self._lines[name].append(line)
                self._changed.notify_all()
        with self._changed:  # end of stream: the process is exiting
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines["stderr"])

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def _hung(self, limit: float, what: str) -> AssertionError:
        return AssertionError(
            f"{what}: still not there after {limit:.0f} s (hung?): {' '.join(self.cmd)[:300]}\n"
            f"{_tail(self.stderr)}"
        )

    def wait_for_line(self, text: str, stream: str = "stderr", *, limit: float = LIMIT_S) -> str:
        """The first line of `stream` that contains `text`, once the process has printed it.
        Fails if the process ends without printing it."""
        deadline = time.monotonic() + limit
        seen = 0
        with self._changed:
            while True:
                lines = self._lines[stream]
                for line in lines[seen:]:
                    if text in line:
                        return line
                seen = len(lines)
                if not self._readers[stream].is_alive():
                    raise AssertionError(
                        f"the process ended (code {self.popen.wait()}) without printing "
                        f"{text!r} on {stream}:\n{_tail(''.join(self._lines['stderr']))}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._hung(limit, f"waiting for {text!r} on {stream}")
                self._changed.wait(min(left, 1.0))

    def wait_until(
        self, condition: Callable[[], bool], *, poll: float = 0.01, limit: float = LIMIT_S
    ) -> bool:
        """Poll `condition()` while the process runs: True once it holds, False if the process
        ended first (so a test can say which)."""
        deadline = time.monotonic() + limit
        while self.popen.poll() is None:
            if condition():
                return True
            if time.monotonic() > deadline:
                raise self._hung(limit, "waiting for a condition")
            time.sleep(poll)
        return False

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def finish(self, *, limit: float = LIMIT_S) -> int:
        """Wait for the process to end and for its output to be read; its exit code."""
        try:
            code = self.popen.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise self._hung(limit, "waiting for the process to end") from None
        for reader in self._readers.values():
            reader.join()
        return code

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for reader in self._readers.values():
            reader.join()


def finish_all(procs: Sequence[Process], *, limit: float = LIMIT_S) -> list[int]:
    """Wait for every process to end; their exit codes. Once one fails, the others (which may
    wait for it forever, as the processes of one distributed run do) are killed and the test
    fails with the failed one's output."""
    deadline = time.monotonic() + limit
    while any(p.returncode is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed:
            for p in procs:
                if p.returncode is None:
                    p.popen.kill()
            p = failed[0]
            code = p.finish()
            raise AssertionError(
                f"{' '.join(p.cmd)[:300]} failed (code {code}):\n{_tail(p.stderr)}"
            )
        if time.monotonic() > deadline:
            raise procs[0]._hung(limit, "waiting for every process to end")
        time.sleep(0.05)
    return [p.finish() for p in procs]
