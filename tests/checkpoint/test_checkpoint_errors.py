"""What the user can get wrong ends in an RlhfJaxError naming the folder and the problem:
an incompatible or missing checkpoint, an unwritable folder, a full disk; a failed save
leaves the training state and the previous checkpoint untouched."""

import errno
import logging
import os
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from processes import run

from rlhf_jax.checkpointing import Checkpointer, abstract_state
from rlhf_jax.errors import RlhfJaxError


def model(d=4, layers=2):
    return {
        "embed": jnp.ones((10, d)),
        "layers": [{"w": jnp.full((d, d), i, jnp.float32)} for i in range(layers)],
        "step": jnp.array(5),
    }


def saved_at(path, tree, step=1, meta=None):
    with Checkpointer(path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(step, tree, meta or {"stage": "sft"})
    return Checkpointer(path, save_every=1, keep=1)


def test_incompatible_shapes_name_the_folder_and_the_leaves(tmp_path):
    ckpt = saved_at(tmp_path, model(d=4))
    with pytest.raises(RlhfJaxError) as err:
        ckpt.restore(target=abstract_state(model(d=8)))
    msg = str(err.value)
    assert str(tmp_path / "1") in msg and "does not fit the state being restored" in msg
    assert "embed: saved float32[10, 4], expected float32[10, 8]" in msg
    assert "layers/1/w: saved float32[4, 4], expected float32[8, 8]" in msg


def test_missing_and_extra_leaves_and_dtypes(tmp_path):
    ckpt = saved_at(tmp_path, model(layers=2))
    with pytest.raises(RlhfJaxError, match="layers/2/w: missing from the checkpoint"):
        ckpt.restore(target=model(layers=3))
    with pytest.raises(RlhfJaxError, match="layers/1/w: not in the state restored"):
        ckpt.restore(target=model(layers=1))
    wrong = model() | {"step": jnp.array(5.0)}
    with pytest.raises(RlhfJaxError, match=r"step: saved int32\[\], expected float32\[\]"):
        ckpt.restore(target=wrong)


def test_meta_expectations(tmp_path):
    ckpt = saved_at(tmp_path, model(), meta={"stage": "sft", "config": "abc"})
    with pytest.raises(RlhfJaxError) as err:
        ckpt.restore(target=model(), expect={"stage": "rm", "config": "abc"})
    assert "written by a different run: stage: saved 'sft', expected 'rm'" in str(err.value)
    assert str(tmp_path / "1") in str(err.value)


def test_missing_folder_or_step(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(RlhfJaxError, match=f"checkpoint folder {missing} does not exist"):
        Checkpointer(missing, save_every=1, keep=1, read_only=True)
    with pytest.raises(RlhfJaxError, match=f"checkpoint folder {missing} does not exist"):
        Checkpointer(missing, save_every=1, keep=1).restore(target=model())
    with pytest.raises(RlhfJaxError, match=f"no complete checkpoint in {missing}"):
        Checkpointer(missing, save_every=1, keep=1).restore(target=model())  # now it exists
    ckpt = saved_at(tmp_path / "run", model(), step=4)
    with pytest.raises(RlhfJaxError, match=r"no checkpoint for step 3 in .*found steps \[4\]"):
        ckpt.restore(3, target=model())


def test_unwritable_folder_fails_at_open(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RlhfJaxError, match="is a file, not a folder"):
        Checkpointer(tmp_path / "file", save_every=1, keep=1)
    with pytest.raises(RlhfJaxError, match=f"cannot write checkpoints to {tmp_path}/file/ck"):
        Checkpointer(tmp_path / "file" / "ck", save_every=1, keep=1)


@pytest.mark.parametrize("async_save", [True, False])
def test_folder_lost_mid_run_fails_the_save_not_the_state(tmp_path, async_save):
    run = tmp_path / "run"
    ckpt = Checkpointer(run, save_every=1, keep=2, async_save=async_save)
    state = model()
    ckpt.save(1, state, {})
    ckpt.wait()
    moved = tmp_path / "moved"
    run.rename(moved)  # e.g. a volume unmounted under the run
    run.write_text("not a folder")
    with pytest.raises(RlhfJaxError) as err:
        ckpt.save(2, state, {})
        ckpt.wait()
    assert f"could not save checkpoint step 2 to {run}" in str(err.value)
    assert "the training state is unchanged" in str(err.value)
    np.testing.assert_array_equal(state["embed"], np.ones((10, 4)))  # still usable
    run.unlink()
    moved.rename(run)
    ckpt.close()
    restored, _ = Checkpointer(run, save_every=1, keep=2).restore(target=state)
    np.testing.assert_array_equal(restored["layers"][1]["w"], np.ones((4, 4)))


DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    import jax.numpy as jnp, numpy as np
    from rlhf_jax.checkpointing import Checkpointer
    from rlhf_jax.errors import RlhfJaxError

    ckpt = Checkpointer(sys.argv[1], save_every=1, keep=1)
    small = {"w": jnp.ones(10)}
    ckpt.save(1, small, {})
    ckpt.wait()
    # files may not grow past 1 MB from here on: writes fail as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    big = {"w": jnp.arange(1 << 20, dtype=jnp.float32)}
    try:
        ckpt.save(2, big, {})  # async: the write fails in the background ...
        ckpt.wait()  # ... and is reported here
    except RlhfJaxError as err:
        print("ERROR", err)
    np.testing.assert_array_equal(big["w"][-3:], [(1 << 20) - 3, (1 << 20) - 2, (1 << 20) - 1])
    assert ckpt.latest_step() == 1
    restored, _ = ckpt.restore(target=small)
    assert float(restored["w"].sum()) == 10
    ckpt.close()
    print("OK")
    """
)


def test_disk_full_during_async_save(tmp_path):
    proc = run([sys.executable, "-c", DISK_FULL, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "OK"
    error = next(line for line in lines if line.startswith("ERROR"))
    # One line with the folder and the OS's reason, not orbax's 300 lines of tracebacks.
    assert error == (
        f"ERROR could not save checkpoint step 2 to {tmp_path}: File too large (EFBIG, errno "
        "27); the training state is unchanged and the latest checkpoint is still step 1"
    )
    assert "Traceback" not in proc.stderr and "absl" not in proc.stderr, proc.stderr[:2000]
    assert sorted(p.name for p in Path(tmp_path).iterdir() if p.name.isdigit()) == ["1"]


def test_no_space_left_names_the_folder_and_errno_in_one_line(tmp_path, monkeypatch, caplog):
    """ENOSPC raised inside orbax's save threads (here by the meta writer): the error says
    the folder, the reason and the errno; orbax's own tracebacks of it are not logged."""
    import orbax.checkpoint as ocp

    async def disk_full(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    state = model()
    ckpt.save(1, state, {})
    ckpt.wait()
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    caplog.set_level(logging.INFO)
    with pytest.raises(RlhfJaxError) as err:
        ckpt.save(2, state, {})
        ckpt.wait()
    assert str(err.value) == (
        f"could not save checkpoint step 2 to {tmp_path}: No space left on device (ENOSPC, "
        "errno 28); the training state is unchanged and the latest checkpoint is still step 1"
    )
    assert [r.getMessage()[:200] for r in caplog.records if r.exc_info] == []
    monkeypatch.undo()
    ckpt.close()
    assert Checkpointer(tmp_path, save_every=1, keep=1).latest_step() == 1
