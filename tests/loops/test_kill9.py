"""SIGKILL at random moments of a PPO run (one of them while a checkpoint is being written),
each time rerunning the same command: the newest complete checkpoint restores and the run ends
with exactly the metrics and weights of a run that was never interrupted."""

import json
import random
import signal
import sys
import time

import numpy as np
from processes import Process
from safetensors.numpy import load_file

from rlhf_jax.cli import main

SEED = 1234  # of the kill delays; a failure message repeats it


def _command(run_dir, out):
    data = run_dir / "data"
    return [
        "ppo",
        "--output",
        str(out),
        "log.every=1",
        "log.progress=false",
        "ppo.iterations=8",
        "ppo.rollout_batch=16",
        "ppo.minibatch_size=8",
        "ppo.epochs=1",
        "ppo.max_new_tokens=8",
        "ppo.adaptive_kl=true",
        "ptx.batch_size=8",
        "checkpoint.save_every=1",
        "checkpoint.keep=2",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        f"ptx.data={data / 'pretrain.jsonl'}",
    ]


def _saving(ckpt_dir) -> bool:
    """An orbax save in flight: its temporary folder exists."""
    return ckpt_dir.exists() and any("tmp" in p.name for p in ckpt_dir.iterdir())


def _committed(ckpt_dir) -> bool:
    """A finished checkpoint: orbax gives its folder the step's name once it is complete."""
    return ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def _lines(path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _kill_when(run_dir, out, condition):
    """Start the command, SIGKILL it once `condition()` holds; (returncode, met, stderr).
    `met` is False when the run ended before the condition held."""
    with Process([sys.executable, "-m", "rlhf_jax.cli", *_command(run_dir, out)]) as proc:
        met = proc.wait_until(condition, poll=0.002)
        proc.send_signal(signal.SIGKILL)
        code = proc.finish()
        return code, met, proc.stderr[-2000:]


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    # After a kill, the steps since the newest checkpoint run (and are logged) again; the
    # later line of a step is the one that counts.
    return {
        r["step"]: {k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
        for r in rows
        if r["stage"] == "ppo"
    }


def test_kill9_at_random_points_then_resume_is_exact(run_dir, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "killed"
    ckpt_dir = out / "checkpoints" / "ppo"
    metrics = out / "metrics.jsonl"

    # Kill 1: the moment a checkpoint is being written (after a few iterations).
    code, met, err = _kill_when(run_dir, out, lambda: _lines(metrics) >= 2 and _saving(ckpt_dir))
    assert code == -signal.SIGKILL and met, f"no save in flight was caught\n{err}"
    # Kills 2 and 3: a random moment after the resumed run has made some progress and a
    # checkpoint is complete (on a loaded machine a save can take longer than a step, and a
    # kill before any commit would leave nothing to resume from).
    for _ in range(2):
        target = _lines(metrics) + rng.randint(1, 2)
        delay = rng.uniform(0.0, 0.5)
        state = {}

        def reached(target=target, delay=delay, state=state):
            if _lines(metrics) < target or not _committed(ckpt_dir):
                return False
            state.setdefault("at", time.time())
            return time.time() - state["at"] >= delay

        code, met, err = _kill_when(run_dir, out, reached)
        assert code == -signal.SIGKILL and met, f"seed {SEED}: no kill at the chosen point\n{err}"
    saved = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 8, f"seed {SEED}: checkpoints {saved}"

    # The same command once more runs to the end; an uninterrupted run for comparison.
    assert main(_command(run_dir, out)) == 0
    whole = tmp_path / "whole"
    assert main(_command(run_dir, whole)) == 0
    assert sorted(_metrics(out)) == list(range(1, 9))
    assert _metrics(out) == _metrics(whole), f"seed {SEED}"
    wa = load_file(out / "policy" / "model.safetensors")
    wb = load_file(whole / "policy" / "model.safetensors")
    for name in wb:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
