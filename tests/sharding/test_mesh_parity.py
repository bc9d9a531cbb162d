"""Acceptance of the scale-out: on 8 simulated devices, meshes (data, fsdp, tensor) =
(8,1,1), (1,8,1), (2,2,2), (1,2,4) give the metrics and updated weights of one device for an
SFT step, an RM step, a DPO step, a PPO iteration and a critic-free GRPO iteration (groups,
KL in the loss, unequal micro-batches); the sharded SFT and DPO steps accumulate 2
micro-batches of unequal counts and must equal one device taking the batch whole (the counts
are global sums, nothing per device); FSDP really splits weights and Adam moments.

The device count is fixed before JAX starts, so the work runs in subprocesses
(`parity_script.py`): the one-device reference and two halves of the meshes, concurrently.
"""

import fcntl
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from processes import Process, finish_all

HERE = Path(__file__).parent
MESHES = ["8x1x1", "1x8x1", "2x2x2", "1x2x4"]
GROUPS = [["ref"], MESHES[:2], MESHES[2:]]
RTOL, ATOL = 1e-4, 1e-5


def result_line(stdout: str) -> dict:
    """The script's JSON line (libraries such as gloo may print to stdout too)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _run_all(out_dir: Path) -> tuple[dict, dict]:
    with ExitStack() as stack:  # a failure leaves none of them running
        procs = []
        for i, modes in enumerate(GROUPS):
            cmd = [sys.executable, str(HERE / "parity_script.py"), str(HERE.parent)]
            cmd += [str(out_dir / f"group{i}.npz"), *modes]
            procs.append(stack.enter_context(Process(cmd)))
        codes = finish_all(procs)
    facts: dict = {}
    for proc, code in zip(procs, codes):
        assert code == 0, proc.stderr[-4000:]
        facts.update(result_line(proc.stdout))
    arrays = {}
    for i in range(len(GROUPS)):
        with np.load(out_dir / f"group{i}.npz") as data:
            arrays.update({k: data[k] for k in data.files})
    return facts, arrays


@pytest.fixture(scope="session")
def mesh_runs(tmp_path_factory):
    """(facts, arrays) of all runs, computed once per test session even under xdist: the
    first worker runs the subprocesses, the others wait on a lock and read its files."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return _run_all(tmp_path_factory.mktemp("mesh_parity"))
    shared = tmp_path_factory.getbasetemp().parent / "mesh_parity"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "facts.json"
        if not done.exists():
            facts, arrays = _run_all(shared)
            done.write_text(json.dumps(facts))
        facts = json.loads(done.read_text())
    arrays = {}
    for i in range(len(GROUPS)):
        with np.load(shared / f"group{i}.npz") as data:
            arrays.update({k: data[k] for k in data.files})
    return facts, arrays


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_equal_one_device(mesh_runs, mesh):
    facts, arrays = mesh_runs
    assert facts["devices"] == 8
    want = {k.split("|", 1)[1]: v for k, v in arrays.items() if k.startswith("ref|")}
    got = {k.split("|", 1)[1]: v for k, v in arrays.items() if k.startswith(mesh + "|")}
    assert set(got) == set(want)
    kinds = {name.split("|")[0] for name in want}
    assert kinds == {"sft", "rm", "dpo", "ppo", "grpo"}
    assert any(name.startswith("grpo|metric:ppo/kl_loss") for name in want)
    assert any(name.startswith("ppo|metric:ppo/ptx") for name in want)
    bad = {}
    for name, w in want.items():
        if not np.allclose(got[name], w, rtol=RTOL, atol=ATOL):
            bad[name] = float(np.max(np.abs(got[name] - w)))
    assert not bad, f"mesh {mesh}: differs from one device (max abs error): {bad}"
    assert facts[mesh]["donated"], "the old state should be donated to the step"
    assert facts[mesh]["frozen_alive"], "donating the PPO state must not free the frozen weights"
    assert facts[mesh]["ema_like_policy"]
    assert facts[mesh]["grpo_no_critic"]


# embed [vocab, embed] and q [layers, embed, heads, head_dim] under the default rules
# (embed -> fsdp; vocab, heads -> tensor; axes of size 1 dropped), and the fraction of each
# weight a device holds.
PLACEMENT = {
    "8x1x1": ([], [], 1),
    "1x8x1": ([None, "fsdp"], [None, "fsdp"], 1 / 8),
    "2x2x2": (["tensor", "fsdp"], [None, "fsdp", "tensor"], 1 / 4),
    "1x2x4": (["tensor", "fsdp"], [None, "fsdp", "tensor"], 1 / 8),
}


@pytest.mark.parametrize("mesh", MESHES)
def test_weights_and_adam_moments_are_split_by_the_rules(mesh_runs, mesh):
    facts = mesh_runs[0][mesh]
    embed_spec, q_spec, fraction = PLACEMENT[mesh]
    assert facts["embed_spec"] == embed_spec and facts["q_spec"] == q_spec
    assert facts["embed_bytes_ratio"] == pytest.approx(fraction)
    assert facts["moments_like_params"]
    assert facts["count_replicated"]


def test_batch_that_does_not_divide_the_data_shards_names_the_key(mesh_runs):
    message = mesh_runs[0]["1x8x1"]["batch_error"]
    assert "sft.batch_size" in message and "mesh.fsdp=8" in message and "6" in message
