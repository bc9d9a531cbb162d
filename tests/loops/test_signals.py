"""Signals a training command gets from its surroundings: a closed terminal (SIGHUP) saves and
stops like SIGTERM, `nohup` keeps the run going, and a second Ctrl-C ends the process at once
with exit 130 and one line. Signals are sent only once the process has said it is ready."""

import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from processes import LIMIT_S
from tiny import tiny_sft_inputs

from rlhf_jax.checkpointing import (
    Checkpointer,
    clear_preemption,
    install_preemption_handler,
    preemption_requested,
)

STEPS = 100_000  # never reached: the run stops on the signal


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_sft_inputs(tmp_path_factory.mktemp("inputs"))


def _wait(pid, deadline):
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.1)


# The forked child only calls exec, so JAX's warning about forking its threads does not apply.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_closing_the_terminal_saves_a_checkpoint_and_exits_0(inputs, tmp_path):
    """The run's terminal is a pseudo-terminal; closing its master side is what closing a
    terminal window or losing an SSH session does: the kernel sends SIGHUP, and every later
    write to the terminal fails. With checkpoint.save_every=0 nothing would be saved."""
    model, demos = inputs
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "rlhf_jax.cli",
        "sft",
        "--output",
        str(out),
        f"model.path={model}",
        f"sft.data={demos}",
        f"sft.steps={STEPS}",
        "sft.batch_size=4",
        "log.every=1",
        "checkpoint.save_every=0",
    ]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: session leader with the pseudo-terminal as its own
        try:
            # As a shell in a new terminal starts it: were SIGHUP left ignored (the suite
            # started under nohup), the run would take that for nohup and rightly keep going.
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            os.execv(sys.executable, args)
        finally:
            os._exit(127)
    deadline = time.monotonic() + LIMIT_S  # a hang guard only: readiness is the logged step
    metrics = out / "metrics.jsonl"
    try:
        # Ready once a step is logged (its handler is in place); read what it prints meanwhile.
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert os.waitpid(pid, os.WNOHANG)[0] == 0, "the run ended before training"
            assert time.monotonic() < deadline, "the run never logged a step"
            if select.select([terminal], [], [], 0.1)[0]:
                os.read(terminal, 1 << 16)
        os.close(terminal)
        terminal = None
        code = _wait(pid, deadline)
    finally:
        if terminal is not None:
            os.close(terminal)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert code == 0, f"exit {code}"
    saved = Checkpointer(out / "checkpoints" / "sft", 0, 1, read_only=True).latest_step()
    assert saved is not None and 1 <= saved < STEPS
    assert not (out / "sft").exists()  # stopped, not finished


def test_sighup_requests_a_stop_unless_the_process_started_with_it_ignored():
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        uninstall = install_preemption_handler()
        try:
            # (checked first: unhandled, the signal below would end the test session)
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGHUP)
            assert preemption_requested()
        finally:
            uninstall()
            clear_preemption()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` starts a command
        uninstall = install_preemption_handler()
        try:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not preemption_requested()
        finally:
            uninstall()
    finally:
        signal.signal(signal.SIGHUP, before)


# The training commands' handler, with an async save in flight when Ctrl-C comes twice.
TWICE = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from rlhf_jax import cli
    from rlhf_jax.checkpointing import Checkpointer, install_preemption_handler
    from rlhf_jax.checkpointing import preemption_requested

    install_preemption_handler(second_interrupt=cli._exit_interrupted)
    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=1)
    print("ready", flush=True)
    while not preemption_requested():
        time.sleep(0.01)
    ckpt.save(1, {"w": jnp.arange(1 << 22, dtype=jnp.float32)}, {})
    print("stopping", flush=True)
    while True:  # waiting for the save, as a stopping stage does
        ckpt.wait()
        time.sleep(0.01)
    """
)


def test_a_second_ctrl_c_exits_130_with_one_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", TWICE, str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "stopping"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=LIMIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    # The first Ctrl-C is acknowledged at once (a save can take minutes), the second ends it.
    assert err == (
        "Ctrl-C: stopping after the step in flight; saving first "
        "(Ctrl-C again to stop at once without saving)\n"
        "error: interrupted\n"
    )
