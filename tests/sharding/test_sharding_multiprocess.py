"""Two CPU processes joined by `initialize` (gloo collectives) act as one 8-device mesh:
each loads its own rows, `make_global_batch` assembles the global batch, and a jitted
function over it and an FSDP x tensor sharded weight matches NumPy on every process."""

import json
import os
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

from processes import Process, finish_all

SCRIPT = Path(__file__).parent / "multiprocess_script.py"


def result_line(stdout: str) -> dict:
    """The script's JSON line (libraries such as gloo may print to stdout too)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_two_processes_form_one_mesh_and_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ExitStack() as stack:  # a failure leaves neither process running
        procs = []
        for pid in range(2):
            env = dict(os.environ, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
            env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
            procs.append(stack.enter_context(Process([sys.executable, SCRIPT], env=env)))
        codes = finish_all(procs)
    results = []
    for proc, code in zip(procs, codes):
        assert code == 0, proc.stderr[-4000:]
        results.append(result_line(proc.stdout))
    for pid, r in enumerate(results):
        assert r["started"] and r["process"] == pid
        assert (r["processes"], r["devices"]) == (2, 8)
        assert r["global_shape"] == [8, 6]
        assert r["max_error"] < 1e-5
        # 3 local rows per process = 6 global rows, not a multiple of data x fsdp = 4
        assert "ppo.rollout_batch" in r["error"] and "global batch of 6" in r["error"]
    assert results[0]["rows"] == [0, 4] and results[1]["rows"] == [4, 8]
