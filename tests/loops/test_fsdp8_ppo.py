"""`rlhf-jax ppo` on 8 simulated CPU devices, FSDP over all 8: the configuration an audit saw
abort in XLA:CPU's collective rendezvous (docs/distributed.md) runs to the end and trains."""

import json
import math
import os
import sys

from processes import run


def test_ppo_runs_with_fsdp_over_8_cpu_devices(run_dir, tmp_path):
    data, out = run_dir / "data", tmp_path / "fsdp8"
    cmd = [
        sys.executable,
        "-m",
        "rlhf_jax.cli",
        "ppo",
        "--output",
        str(out),
        "ppo.iterations=3",
        "ppo.rollout_batch=16",
        "ppo.minibatch_size=8",
        "ppo.epochs=1",
        "ppo.max_new_tokens=8",
        "ptx.batch_size=8",
        "log.progress=false",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        f"ptx.data={data / 'pretrain.jsonl'}",
        "mesh.data=1",
        "mesh.fsdp=8",
    ]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = run(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["objective/kl"]) for r in rows)
    assert (out / "policy" / "model.safetensors").is_file()
