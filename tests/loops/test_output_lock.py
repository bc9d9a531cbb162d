"""One run at a time per --output: a second run is refused naming the first, a lock left by a
killed run never blocks, and every process of a refused multi-process run stops."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processes import LIMIT_S, run
from tiny import tiny_sft_inputs

from rlhf_jax.cli import main
from rlhf_jax.loops.output_lock import LOCK_FILE, lock_output, release_output_locks

LAUNCHER = Path(__file__).parents[2] / "launch" / "local_multiprocess.py"

# Holds the lock of argv[1] as a running command would, until its stdin closes.
HOLDER = (
    "import sys\n"
    "from rlhf_jax.loops.output_lock import lock_output\n"
    "lock_output(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_sft_inputs(tmp_path_factory.mktemp("inputs"))


def _sft(inputs, out):
    model, demos = inputs
    return [
        "sft",
        "--output",
        str(out),
        f"model.path={model}",
        f"sft.data={demos}",
        "sft.steps=2",
        "sft.batch_size=4",
        "log.progress=false",
    ]


def _hold(out):
    out.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_is_refused_and_a_killed_ones_lock_does_not_block(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        assert main(_sft(inputs, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: output folder {out} is in use by another run (pid ")
        assert f"pid {holder.pid} on host {socket.gethostname()}, started " in err
        assert "wait for it to end or choose another --output" in err
        assert len(err.splitlines()) == 1
        # Refused before writing anything: the running run's files are its own.
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    finally:
        holder.kill()
    assert main(_sft(inputs, out)) == 0  # the kernel dropped the dead process's lock
    assert (out / "sft" / "model.safetensors").is_file()
    assert (out / LOCK_FILE).read_text() == ""  # released: no stale holder named


def test_the_lock_names_its_holder_and_is_taken_once_per_process(tmp_path):
    lock_output(tmp_path)
    try:
        lock_output(tmp_path)  # the same process again (one command, several stages)
        record = (tmp_path / LOCK_FILE).read_text()
        assert f'"pid": {os.getpid()}' in record and socket.gethostname() in record
    finally:
        release_output_locks()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    holder = _hold(tmp_path)  # another process may take it now
    holder.stdin.close()
    assert holder.wait() == 0


def test_every_process_of_a_refused_multiprocess_run_stops(inputs, tmp_path):
    """Only process 0 locks; it tells the others, so none waits for a process 0 that left."""
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        proc = run(
            [
                sys.executable,
                str(LAUNCHER),
                "--processes",
                "2",
                "--devices-per-process",
                "1",
                "--log-dir",
                str(tmp_path / "logs"),
                "--timeout",  # the launcher's own hang guard, which kills every process
                str(LIMIT_S),
                "--",
                sys.executable,
                "-m",
                "rlhf_jax.cli",
                *_sft(inputs, out),
            ],
            limit=LIMIT_S + 120,  # past the launcher's, which then leaves the logs
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
    finally:
        holder.kill()
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert proc.returncode == 2, logs
    assert len(logs) == 2
    for log in logs.values():
        assert f"error: output folder {out} is in use by another run (pid {holder.pid}" in log
        assert "Traceback" not in log
