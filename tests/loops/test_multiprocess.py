"""Two processes x two CPU devices, joined by jax.distributed through the local launcher (the
code path of a multi-host pod), run RL iterations with the metrics of one process with the
same four devices: PPO on the reward model, GRPO on a reward function over text, and the
same GRPO with DAPO's dynamic sampling (every process keeps the same groups and draws the
same rounds). Without filters each process encodes only the rows of the data files its slice
of the batches reads (half of what the run reads), and scores only the responses its devices
hold (half of each rollout)."""

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from processes import LIMIT_S, run

LAUNCHER = Path(__file__).parents[2] / "launch" / "local_multiprocess.py"


ALGORITHMS = {
    "ppo": [],
    "grpo_text_reward": [
        "ppo.reward_fn=counted_reward:topics_gold_counted",
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


# The built-in gold reward, recording how many responses each process scores per call.
COUNTED = """
import os
from rlhf_jax.registry import resolve

def topics_gold_counted(prompts, completions):
    with open(os.path.join(os.environ["SCORED_DIR"], f"{os.getpid()}.txt"), "a") as f:
        f.write(f"{len(completions)}\\n")
    return resolve("reward_fn", "topics_gold")(prompts, completions)
"""
ENCODED = re.compile(r"^(\S+): process (\d) of 2 encoded (\d+) of (\d+) rows", re.M)


def _scored(folder):
    """Responses per call of the reward function, by process (pid)."""
    return {p.stem: [int(n) for n in p.read_text().split()] for p in folder.glob("*.txt")}


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_two_processes_match_one(run_dir, tmp_path, algorithm):
    (tmp_path / "counted_reward.py").write_text(textwrap.dedent(COUNTED))
    scored = {n: tmp_path / f"scored_{n}" for n in ("one", "two")}
    for folder in scored.values():
        folder.mkdir()
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    extra = ALGORITHMS[algorithm]
    one = tmp_path / "one"
    single = run(
        _ppo_args(run_dir, one, extra),
        env=dict(
            env,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            SCORED_DIR=str(scored["one"]),
        ),
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
        env=dict(env, SCORED_DIR=str(scored["two"])),
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
    # Each process encoded half of the rows the run reads: the 2 prompt batches (of 16 rows, 8
    # for GRPO) and (PPO-ptx) the 4 ptx batches of 8, each read half by either process.
    whole = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    encoded = {(f, int(p)): (int(k), int(n)) for f, p, k, n in ENCODED.findall(whole)}
    files = {f for f, _ in encoded}
    if any(a.startswith("ppo.rollout_filters") for a in extra):
        files = set()  # every process holds every row: a filter's rounds draw from all of them
        assert not encoded, encoded
    else:
        assert len(files) == (1 if "ptx.coef=0" in extra else 2), logs
    for f in files:
        (k0, n), (k1, _) = encoded[(f, 0)], encoded[(f, 1)]
        rollout = 8 if "ppo.rollout_batch=8" in extra else 16
        read = 2 * rollout if f.endswith("ppo_prompts.jsonl") else 4 * 8
        assert k0 == k1 == read // 2 < n, (f, encoded)
    if algorithm == "grpo_text_reward":
        # one process scores all 16 responses of a rollout, two score 8 each (plus the check
        # call of 3 before anything loads)
        assert sorted(_scored(scored["one"]).values()) == [[3, 16, 16]]
        assert sorted(_scored(scored["two"]).values()) == [[3, 8, 8], [3, 8, 8]]
