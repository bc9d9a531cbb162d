"""The pipeline on a simulated 2x2x2 device mesh (data x fsdp x tensor) trains like one device.

Runs in a subprocess: the device count must be set before JAX starts. Training curves before
PPO (pretrain, SFT, RM) must match the single-device run of test_pipeline.py step for step;
PPO samples tokens, so float differences of a sharded reduction can change which tokens are
drawn, and only its first iteration is compared.
"""

import json
import os
import sys

import numpy as np
from processes import run
from test_pipeline import TINY


def _curves(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {(r["stage"], r["step"]): r for r in rows}


def test_sharded_pipeline_matches_one_device(run_dir, tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    out = tmp_path / "mesh"
    cmd = [
        sys.executable,
        "-m",
        "rlhf_jax.cli",
        "pipeline",
        "--config",
        "configs/quickstart.yaml",
        "--output",
        str(out),
        *TINY,
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    ]
    proc = run(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, mesh = _curves(run_dir), _curves(out)
    assert set(one) == set(mesh)
    for (stage, step), row in one.items():
        if stage.startswith("ppo") and step > 1:
            continue
        for key, value in row.items():
            if key in ("stage", "step", "time") or key.startswith("perf/"):
                continue
            np.testing.assert_allclose(
                mesh[(stage, step)][key],
                value,
                rtol=2e-3,
                atol=2e-4,
                err_msg=f"{stage} step {step} {key}",
            )
