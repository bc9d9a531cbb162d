"""A host gather that one process reaches 40 s after the other (the first collective of a
group of devices: gloo waits 30 s for the others to connect, a limit no setting changes)
works through `rlhf_jax.processes`, which waits first at the coordination service's barrier.
A loaded CI run failed this way in a 2-process `rlhf-jax sft` (`Gloo context initialization
failed: ... GetKeyValue() timed out ... 30s`) before the row encoders' gathers went through
it. The 40 s delay sets up the condition; no verdict depends on how long anything takes."""

import json
import os
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

from processes import Process, finish_all

SCRIPT = Path(__file__).parent / "late_arrival_script.py"


def _run_pair(late_s: float, control: bool = False) -> list[tuple[int, str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ExitStack() as stack:
        procs = []
        for pid in range(2):
            env = dict(os.environ, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", LATE_S=str(late_s))
            env["CONTROL"] = "1" if control else "0"
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
            procs.append(stack.enter_context(Process([sys.executable, SCRIPT], env=env)))
        codes = finish_all(procs)
    return [(code, p.stdout, p.stderr) for code, p in zip(codes, procs)]


def test_a_process_forty_seconds_late_to_a_gather_is_waited_for():
    for code, out, err in _run_pair(40.0):
        assert code == 0, err[-3000:]
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert json.loads(line.removeprefix("RESULT "))["gathered"] == [1, 2]
