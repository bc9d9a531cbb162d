"""Checkpoints across processes: restoring onto another mesh, a process killed mid-save, and
a preempted (SIGTERM) run that saves and exits cleanly.

The mesh test runs in a subprocess: the device count must be set before JAX starts.
"""

import os
import signal
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from processes import Process, run

from rlhf_jax.checkpointing import (
    Checkpointer,
    clear_preemption,
    install_preemption_handler,
    preemption_requested,
)


def run_script(script, *args):
    return run([sys.executable, "-c", script, *map(str, args)])


RESHARD = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from rlhf_jax.checkpointing import Checkpointer, abstract_state

    assert jax.device_count() == 8
    devices = np.array(jax.devices())
    flat = Mesh(devices, ("data",))
    values = {
        "w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16),
        "b": np.arange(16, dtype=np.float32),
        "step": np.int32(11),
    }
    saved_shardings = {
        "w": NamedSharding(flat, P("data", None)),
        "b": NamedSharding(flat, P("data")),
        "step": NamedSharding(flat, P()),
    }
    state = jax.tree.map(jax.device_put, values, saved_shardings)
    assert state["w"].addressable_shards[0].data.shape == (1, 16)
    with Checkpointer(sys.argv[1], save_every=1, keep=1) as ckpt:
        ckpt.save(1, state, {"mesh": [8]})

    grid = Mesh(devices.reshape(2, 4), ("fsdp", "tensor"))
    wanted = {
        "w": NamedSharding(grid, P("tensor", "fsdp")),
        "b": NamedSharding(grid, P(("fsdp", "tensor"))),
        "step": NamedSharding(grid, P()),
    }
    target = abstract_state(jax.eval_shape(lambda: values), wanted)
    with Checkpointer(sys.argv[1], save_every=1, keep=1) as ckpt:
        restored, meta = ckpt.restore(target=target)
    assert meta == {"mesh": [8]}
    for name, array in restored.items():
        np.testing.assert_array_equal(np.asarray(array), values[name])
        assert array.sharding == wanted[name], (name, array.sharding)
    assert restored["w"].addressable_shards[0].data.shape == (2, 8)
    assert restored["b"].addressable_shards[0].data.shape == (2,)
    print("OK")
    """
)


def test_restore_onto_another_mesh(tmp_path):
    proc = run_script(RESHARD, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from rlhf_jax.checkpointing import Checkpointer

    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=1)  # keep=1: step 1 goes once 2 is in
    ckpt.save(1, {"w": jnp.ones(4), "big": jnp.zeros(1 << 24)}, {"step": 1})
    ckpt.wait()
    big = jnp.arange(1 << 24, dtype=jnp.float32)
    ckpt.save(2, {"w": jnp.full(4, 2.0), "big": big}, {"step": 2})
    # save() returned: the 64 MB are being written in the background; die now
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    proc = run_script(KILLED, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "1" in names and "2" not in names, names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # half-written

    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)  # cleans up the unfinished save
    assert ckpt.latest_step() == 1
    target = {"w": jnp.zeros(4), "big": jnp.zeros(1 << 24)}
    restored, meta = ckpt.restore(target=target)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert ckpt.save(
        2, {"w": jnp.full(4, 2.0), "big": jnp.arange(1 << 24, dtype=jnp.float32)}, {"step": 2}
    )
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]


PREEMPTED = textwrap.dedent(
    """
    import itertools, sys, time
    import jax, jax.numpy as jnp
    from rlhf_jax.checkpointing import (
        Checkpointer, install_preemption_handler, preemption_requested
    )

    install_preemption_handler()
    ckpt = Checkpointer(sys.argv[1], save_every=1000, keep=2)
    state = {"w": jnp.zeros(3), "step": jnp.array(0)}
    step = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1}, donate_argnums=0)
    for i in itertools.count(1):  # until the signal: the test's LIMIT_S is the only clock
        state = step(state)
        if i == 3:
            print("running", flush=True)
        if preemption_requested():  # a step boundary: save, then leave cleanly
            ckpt.save(i, state, {"step": i, "preempted": True}, force=True)
            ckpt.close()
            print("saved", i, flush=True)
            sys.exit(0)
        time.sleep(0.01)
    """
)


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path):
    with Process([sys.executable, "-c", PREEMPTED, str(tmp_path)]) as proc:
        proc.wait_for_line("running", "stdout")  # printed after the handler is installed
        assert proc.stdout.splitlines()[0] == "running"
        proc.send_signal(signal.SIGTERM)
        proc.finish()
        out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]
    saved = int(out.split()[-1])
    ckpt = Checkpointer(tmp_path, save_every=1000, keep=2, read_only=True)
    assert ckpt.latest_step() == saved
    state, meta = ckpt.restore(target={"w": jnp.zeros(3), "step": jnp.array(0)})
    assert meta == {"step": saved, "preempted": True}
    assert int(state["step"]) == saved and float(state["w"][0]) == saved


def test_preemption_flag_and_second_ctrl_c():
    # Whatever handled SIGINT before (the default, or SIG_IGN when the suite runs in the
    # background, as CI may) must be back afterwards.
    before = signal.getsignal(signal.SIGINT)
    uninstall = install_preemption_handler()
    try:
        assert not preemption_requested()
        os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: only a request
        assert preemption_requested() and preemption_requested(all_processes=True)
        with pytest.raises(KeyboardInterrupt):  # second Ctrl-C: stop now
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        uninstall()
        clear_preemption()
    assert signal.getsignal(signal.SIGINT) is before
    assert not preemption_requested()
