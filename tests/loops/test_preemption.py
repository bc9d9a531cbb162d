"""A pod run that survives preemption: two JAX processes (the local launcher, gloo on
127.0.0.1) write a PPO run to a gs:// URL (the fake bucket, tests/fake_bucket.py); once a
checkpoint is in the bucket, one worker is SIGKILLed, then the other (a preempted slice loses
every worker); the same launch again resumes from the bucket's checkpoint and ends with
exactly the metrics and weights of a launch that was never interrupted."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
from processes import LIMIT_S, Process, run
from safetensors.numpy import load_file

TESTS = Path(__file__).parents[1]
LAUNCHER = TESTS.parent / "launch" / "local_multiprocess.py"
ITERATIONS = 4


def _launch(run_dir, url, logs):
    data = run_dir / "data"
    return [
        sys.executable,
        str(LAUNCHER),
        "--processes",
        "2",
        "--log-dir",
        str(logs),
        "--timeout",
        str(LIMIT_S),
        "--",
        sys.executable,
        str(TESTS / "fake_bucket.py"),
        "ppo",
        "--output",
        url,
        f"ppo.iterations={ITERATIONS}",
        "ppo.rollout_batch=16",
        "ppo.minibatch_size=8",
        "ppo.epochs=1",
        "ppo.max_new_tokens=8",
        "ptx.batch_size=8",
        "log.every=1",
        "log.progress=false",
        "checkpoint.save_every=1",
        "checkpoint.async_save=false",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        f"ptx.data={data / 'pretrain.jsonl'}",
    ]


def _workers(launcher_pid: int) -> dict[int, int]:
    """{JAX process id: pid} of the launcher's children."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    out = {}
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ids = [e.split(b"=", 1)[1] for e in env if e.startswith(b"JAX_PROCESS_ID=")]
        out[int(ids[0])] = pid
    return out


def _steps(folder: Path) -> list[int]:
    ckpt = folder / "checkpoints" / "ppo"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _metrics(folder: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    return {  # after the restart the steps since the checkpoint are logged again: later wins
        r["step"]: {k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
        for r in rows
        if r["stage"] == "ppo"
    }


def test_a_killed_worker_and_a_restarted_launch_resume_from_the_bucket(
    run_dir, bucket_root, tmp_path
):
    env = dict(os.environ, JAX_PLATFORMS="cpu", FAKE_BUCKET_ROOT=str(bucket_root))
    env["RLHF_JAX_CACHE"] = str(tmp_path / "cache")
    whole_url, paused_url = (
        f"gs://rlhf-test/{tmp_path.name}-whole",
        f"gs://rlhf-test/{tmp_path.name}-p",
    )
    whole, paused = (bucket_root / u.removeprefix("gs://") for u in (whole_url, paused_url))

    done = run(_launch(run_dir, whole_url, tmp_path / "whole_logs"), env=env, limit=LIMIT_S + 120)
    assert done.returncode == 0, done.stderr[-3000:]

    logs = tmp_path / "logs"
    with Process(_launch(run_dir, paused_url, logs), env=env) as launcher:
        # a checkpoint in the bucket, the run not over: preempt worker 1, then worker 0
        assert launcher.wait_until(lambda: bool(_steps(paused)), poll=0.002)
        workers = _workers(launcher.pid)
        os.kill(workers[1], signal.SIGKILL)
        os.kill(workers[0], signal.SIGKILL)
        assert launcher.finish() != 0
    killed_at = _steps(paused)[-1]
    assert killed_at < ITERATIONS

    again = run(_launch(run_dir, paused_url, logs), env=env, limit=LIMIT_S + 120)
    text = (logs / "process_0.log").read_text()
    assert again.returncode == 0, text[-3000:]
    assert f"ppo: resuming from step {killed_at}" in text
    assert sorted(_metrics(paused)) == list(range(1, ITERATIONS + 1))
    assert _metrics(paused) == _metrics(whole)
    a = load_file(str(paused / "policy" / "model.safetensors"))
    b = load_file(str(whole / "policy" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
