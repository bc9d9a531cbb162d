"""XLA:CPU's rendezvous abort on 8 simulated devices (docs/distributed.md): the minimal
program of `cpu_rendezvous_script.py`, dispatched the way the host loop dispatches its steps
(a step's metrics read one step late, so at most two steps are in flight), runs to the end on
8 devices. The unbounded case (LAG=0), which aborts after XLA's 40 s rendezvous timeout, is
not run here: its timing depends on the machine, and its abort is XLA's, not ours."""

import os
import sys
from pathlib import Path

import pytest
from processes import run

SCRIPT = Path(__file__).with_name("cpu_rendezvous_script.py")


@pytest.mark.parametrize("lag", [1, 2])
def test_bounded_dispatch_of_collectives_runs_on_8_cpu_devices(lag):
    proc = run([sys.executable, str(SCRIPT), "8", "60", str(lag)], env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("done"), proc.stdout[-2000:]
