"""`rlhf-jax plan --per-device-batch B`: the batch sizes it sets (hand-computed), that a plan
with it equals a plan with those sizes written out, and its one-line errors."""

import json

import pytest

from rlhf_jax.cli import main
from rlhf_jax.config import Config, load_config
from rlhf_jax.plan.per_device import batch_ways, per_device_overrides

CONFIG = "configs/quickstart.yaml"
SMALL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.mlp_dim=64",
    "task.vocab_size=512",
    "pretrain.steps=0",
    "ppo.epochs=1",
    "ppo.max_new_tokens=4",
    "ptx.coef=0",
]


def _cfg(*overrides: str) -> Config:
    return load_config(Config, None, list(overrides))


def test_sizes_follow_rows_devices_and_grad_accum():
    cfg = _cfg(
        "sft.optim.grad_accum=4",
        "rm.optim.grad_accum=2",
        "ppo.rollout_batch=8",
        "ppo.samples_per_prompt=4",
        "ppo.minibatch_size=8",  # 32 responses: 4 minibatches per epoch
        "ppo.policy_optim.grad_accum=2",
        "ppo.experience_micro_batch=16",  # 2 micro-batches
    )
    got = dict(o.split("=") for o in per_device_overrides(cfg, rows=3, ways=4))
    assert got == {
        "pretrain.batch_size": "12",  # 3 x 4 x grad_accum 1
        "sft.batch_size": "48",  # 3 x 4 x 4
        "rm.batch_size": "24",  # 3 x 4 x 2
        "dpo.batch_size": "12",
        "ppo.minibatch_size": "24",  # 3 x 4 x 2
        "ppo.rollout_batch": "24",  # 4 minibatches x 24 responses / 4 samples
        "ptx.batch_size": "24",
        "ppo.experience_micro_batch": "48",  # 96 responses in 2
    }


def test_ways_are_the_batch_rules_mesh_axes():
    cfg = _cfg()
    assert batch_ways(cfg, {"data": 2, "fsdp": 4, "tensor": 8}) == 8  # batch: [data, fsdp]
    cfg = _cfg("mesh.rules.batch=fsdp")
    assert batch_ways(cfg, {"data": 2, "fsdp": 4, "tensor": 8}) == 4
    cfg = _cfg("mesh.rules.batch=null")
    assert batch_ways(cfg, {"data": 2, "fsdp": 4, "tensor": 8}) == 1


def test_groups_that_do_not_split_are_refused():
    cfg = _cfg("ppo.rollout_batch=3", "ppo.samples_per_prompt=3", "ppo.minibatch_size=9")
    with pytest.raises(Exception, match="not a whole number of groups"):
        per_device_overrides(cfg, rows=1, ways=2)  # 2 responses, groups of 3


def test_plan_equals_the_plan_with_the_sizes_written_out(capsys):
    import jax

    n = jax.device_count()  # the worker's devices (1, 4 or 8): all on `data` by default
    base = ["plan", "--config", CONFIG, *SMALL, "sft.steps=0", "--device-memory", "1GiB"]
    base += ["rm.steps=0", "ppo.samples_per_prompt=2", "ppo.rollout_batch=8", "--json"]
    assert main([*base, "--per-device-batch", "2"]) == 0
    flagged = json.loads(capsys.readouterr().out)
    # 16 responses / minibatch 16: 1 minibatch per epoch; grad_accum 1; groups of 2
    sizes = [f"ppo.minibatch_size={2 * n}", f"ppo.rollout_batch={n}"]
    assert main([*base, *sizes]) == 0
    written = json.loads(capsys.readouterr().out)
    assert list(flagged["stages"]) == ["ppo"]
    assert flagged == written


def test_bad_per_device_batch_is_one_line_and_exit_2(capsys):
    # groups of 3, one minibatch: 1 row on each of the worker's 1, 4 or 8 devices is no group
    args = ["plan", "--config", CONFIG, *SMALL, "ppo.samples_per_prompt=3"]
    args += ["ppo.rollout_batch=4", "ppo.minibatch_size=12", "--per-device-batch", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ppo.samples_per_prompt=3" in err, err
    assert err.count("\n") == 1
    assert main(["plan", "--config", CONFIG, "--per-device-batch", "0"]) == 2
    assert "--per-device-batch" in capsys.readouterr().err
