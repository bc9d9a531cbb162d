"""`rlhf-jax sft | rm | dpo` on two processes x two CPU devices (jax.distributed through the
local launcher, gloo on 127.0.0.1) against one process with the same four devices: each
process tokenizes only its share of the rows (SFT: the rows its slice of the batches reads;
RM and DPO: those, plus its share of the training rows no batch reads, which the stage
evaluates afterwards), and the metrics, the after-training accuracies, the held-out KL and
the data summary equal the one-process run's."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import LIMIT_S, run

LAUNCHER = Path(__file__).parents[2] / "launch" / "local_multiprocess.py"
ENCODED = re.compile(r"^(\S+): process (\d) of 2 encoded (\d+) of (\d+) rows", re.M)
COMMON = ["log.every=1", "log.progress=false"]


def _args(command: str, run_dir: Path, out: Path) -> list[str]:
    data = run_dir / "data"
    per_command = {
        "sft": [f"model.path={run_dir / 'sft'}", f"sft.data={data / 'sft.jsonl'}",
                "sft.steps=2", "sft.batch_size=8"],
        # with sft.data: the bias shift scores every demonstration, each process its share
        "rm": [f"rm.init={run_dir / 'sft'}", f"rm.data={data / 'rankings.jsonl'}",
               f"sft.data={data / 'sft.jsonl'}", "rm.steps=2", "rm.batch_size=8",
               "rm.heldout_fraction=0.2"],
        "dpo": [f"dpo.policy={run_dir / 'sft'}", f"dpo.data={data / 'rankings.jsonl'}",
                "dpo.steps=2", "dpo.batch_size=8", "dpo.heldout_fraction=0.2"],
    }  # fmt: skip
    cli = [sys.executable, "-m", "rlhf_jax.cli", command, "--output", str(out)]
    return [*cli, *COMMON, *per_command[command]]


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


def _close(a, b, what):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("command", ["sft", "rm", "dpo"])
def test_two_processes_encode_half_and_match_one(run_dir, tmp_path, command):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    four = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    single = run(_args(command, run_dir, one), env=four)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, str(LAUNCHER), "--processes", "2", "--devices-per-process", "2",
              "--log-dir", str(tmp_path / "logs"), "--timeout", str(LIMIT_S), "--"]  # fmt: skip
    multi = run([*launch, *_args(command, run_dir, two)], env=env, limit=LIMIT_S + 120)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert multi.returncode == 0, logs[-4000:]
    assert "Rank 1 is connected" in logs  # really two processes in one JAX run

    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        for key, value in x.items():
            if key not in ("stage", "step", "time") and not key.startswith("perf/"):
                _close(value, y[key], key)
    s1, s2 = (json.loads((f / "summary.json").read_text()) for f in (one, two))
    assert s1["data"] == s2["data"]  # rows kept and truncated: every row counted once
    extras = [k for k, v in s1.items() if isinstance(v, float)]
    assert (command == "sft") == (not extras), s1
    for key in extras:
        _close(s1[key], s2[key], key)

    encoded = {(Path(f).name, int(p)): (int(k), int(n)) for f, p, k, n in ENCODED.findall(logs)}
    if command == "sft":  # 2 batches of 8: each process reads 4 rows of each
        assert encoded == {("sft.jsonl", 0): (8, 120), ("sft.jsonl", 1): (8, 120)}
        return
    # Training rankings (48 less 10 held out): each row encoded by exactly one process, about
    # half each (the held-out 10 are encoded whole by both and not counted here).
    (k0, n), (k1, _) = encoded[("rankings.jsonl", 0)], encoded[("rankings.jsonl", 1)]
    assert n == 38 and k0 + k1 == n and abs(k0 - k1) <= 1, encoded
    if command == "rm":  # the demonstrations scored for the bias shift: half each
        assert encoded[("sft.jsonl", 0)] == encoded[("sft.jsonl", 1)] == (60, 120), encoded
