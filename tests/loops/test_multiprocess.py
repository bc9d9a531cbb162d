"""Two processes x two CPU devices, joined by jax.distributed through the local launcher (the
code path of a multi-host pod), run RL iterations with the metrics of one process with the
same four devices: PPO on the reward model, GRPO on a reward function over text (each
process decodes every response: the rollout is gathered from both), and the same GRPO with
DAPO's dynamic sampling (every process keeps the same groups and draws the same rounds)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import LIMIT_S, run

LAUNCHER = Path(__file__).parents[2] / "launch" / "local_multiprocess.py"


ALGORITHMS = {
    "ppo": [],
    "grpo_text_reward": [
        "ppo.reward_fn=topics_gold",
        "ppo.advantage=grpo",
        "ppo.samples_per_prompt=2",
        "ppo.rollout_batch=8",
        "ppo.kl_penalty=loss",
        "ptx.coef=0",
    ],
    # the rollout filter decides on scores gathered from both processes; its extra rounds
    # draw their prompts from the iteration key
    "grpo_dynamic_sampling": [
        "ppo.reward_fn=topics_gold",
        "ppo.advantage=grpo",
        "ppo.samples_per_prompt=2",
        "ppo.rollout_batch=8",
        "ppo.kl_penalty=loss",
        "ptx.coef=0",
        "ppo.rollout_filters=[{name: dynamic_sampling}]",
    ],
}


def _ppo_args(run_dir, out, extra):
    data = run_dir / "data"
    args = [
        sys.executable,
        "-m",
        "rlhf_jax.cli",
        "ppo",
        "--output",
        str(out),
        "ppo.iterations=2",
        "ppo.rollout_batch=16",
        "ppo.minibatch_size=8",
        "ppo.epochs=1",
        "ppo.max_new_tokens=8",
        "ptx.batch_size=8",
        "log.every=1",
        "log.progress=false",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        f"ptx.data={data / 'pretrain.jsonl'}",
        *extra,
    ]
    # what the extra settings make unread is left out (the command would refuse it)
    unread = ("ppo.reward_model=",) if any(a.startswith("ppo.reward_fn=") for a in extra) else ()
    unread += ("ptx.batch_size=", "ptx.data=") if "ptx.coef=0" in extra else ()
    return [a for a in args if not a.startswith(unread)]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_processes_match_one(run_dir, tmp_path, algorithm):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    extra = ALGORITHMS[algorithm]
    one = tmp_path / "one"
    single = run(
        _ppo_args(run_dir, one, extra),
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert single.returncode == 0, single.stderr[-3000:]
    two = tmp_path / "two"
    multi = run(
        [
            sys.executable,
            str(LAUNCHER),
            "--processes",
            "2",
            "--devices-per-process",
            "2",
            "--log-dir",
            str(tmp_path / "logs"),
            "--timeout",  # the launcher's own hang guard, which kills every process
            str(LIMIT_S),
            "--",
            *_ppo_args(run_dir, two, extra),
        ],
        env=env,
        limit=LIMIT_S + 120,  # past the launcher's, which then leaves the logs
    )
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert multi.returncode == 0, logs
    assert "Rank 1 is connected" in logs  # really two processes in one JAX run
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        for key, value in x.items():
            if key in ("stage", "step", "time") or key.startswith("perf/"):
                continue
            np.testing.assert_allclose(y[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert (two / "policy" / "model.safetensors").is_file()
