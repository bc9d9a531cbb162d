"""`rlhf-jax plan`: the JSON it promises, a prediction checked against a measured run, an
8B-shaped plan on abstract inputs, and clear errors for bad input."""

import contextlib
import io
import json
import re
import sys

import pytest
from plan_shapes import CONFIG, SMALL
from processes import LIMIT_S, run

from rlhf_jax.cli import main
from rlhf_jax.plan.measure import measure_in_subprocess
from rlhf_jax.plan.planner import PARTS

LLAMA_8B = [
    "model.d_model=4096",
    "model.n_heads=32",
    "model.n_kv_heads=8",
    "model.mlp_dim=14336",
    "task.vocab_size=128256",
]


def _plan_json(*args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--config", CONFIG, *args, "--json"]) == 0
    return json.loads(out.getvalue())


# 512 responses of 64 + 64 tokens against minibatches of 8: one plan (its compiles are most of
# these tests' time) read by the two tests below.
BIG_ROLLOUT = ["ppo.rollout_batch=512", "ppo.max_prompt_len=64", "ppo.max_new_tokens=64"]


@pytest.fixture(scope="module")
def plan():
    return _plan_json(*SMALL, *BIG_ROLLOUT, "--device-memory", "1GiB")


def test_json_has_the_promised_shape_and_parts_add_up(plan):
    assert set(plan) == {"stages", "device_memory_bytes", "fits"}
    assert plan["device_memory_bytes"] == 2**30 and plan["fits"] is True
    assert list(plan["stages"]) == ["sft", "ppo"]  # no pretraining or RM at 0 steps
    for stage in plan["stages"].values():
        parts = stage["parts"]
        assert set(parts) == set(PARTS)
        assert all(isinstance(v, int) and v >= 0 for v in parts.values())
        assert sum(parts.values()) == stage["peak_bytes_per_device"]
        assert stage["peak_bytes_per_device"] == max(stage["programs"].values())
        assert stage["fits"] is True and stage["largest"] in PARTS
        saves = [s["saves_bytes"] for s in stage["suggestions"]]
        assert saves == sorted(saves, reverse=True)
    sft, ppo = plan["stages"]["sft"], plan["stages"]["ppo"]
    # Adam: two moments per weight; the loop keeps SFT's starting weights beside its copy.
    weights = sft["parts"]["params"]
    assert 2 * weights <= sft["parts"]["optimizer"] < 2 * weights + 1024
    assert sft["parts"]["kept_weights"] == weights and sft["parts"]["frozen"] == 0
    # PPO: policy + critic train; the reference and the reward model (the policy's trunk
    # without its untied LM head, plus a scalar head) are frozen; the EMA copies the policy;
    # the cache lives in sampling.
    assert set(ppo["programs"]) == {"experience", "update"}
    d = ppo["detail"]
    assert d["params/policy"] == d["frozen/reference"] == d["ema/policy"]
    lm_head = 512 * 64 * 4  # task.vocab_size x d_model, float32
    scalar_head = (64 + 1) * 4
    assert d["frozen/reward"] == d["params/critic"] == d["params/policy"] - lm_head + scalar_head
    assert ppo["parts"]["frozen"] == d["frozen/reference"] + d["frozen/reward"]


def test_a_large_rollout_batch_is_offered_a_micro_batched_experience(plan):
    """The experience's forwards set the peak, and the plan offers to run them in
    micro-batches (what a switch saves does not depend on the device's memory)."""
    ppo = plan["stages"]["ppo"]
    assert max(ppo["programs"], key=ppo["programs"].get) == "experience"
    offered = [s for s in ppo["suggestions"] if "ppo.experience_micro_batch=" in s["switch"]]
    assert offered and offered[0]["saves_bytes"] > 0


def test_a_stage_that_does_not_fit_says_so_and_names_switches(capsys):
    args = ["plan", "--config", CONFIG, *SMALL, "ppo.iterations=0", "--device-memory", "2MB"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "sft: compiling step" in captured.err  # progress, off stdout
    out = captured.out
    assert "1.91 MiB per device (--device-memory)" in out
    assert "sft: " in out and "DOES NOT FIT" in out and "largest: activations" in out
    assert "model.remat=true" in out and re.search(r"sft\.optim\.grad_accum=[248]\b", out)


def test_plan_is_within_20_percent_of_a_measured_step():
    """SFT of a 4-layer, 256-wide model: the plan against the peak resident memory of one
    real step in a fresh process (rlhf_jax.plan.measure, docs/memory.md)."""
    overrides = [
        "model.d_model=256",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.mlp_dim=768",
        "task.vocab_size=4096",
        "sft.batch_size=16",
        "sft.max_len=128",
    ]
    result = measure_in_subprocess(CONFIG, "sft", overrides, timeout=LIMIT_S)
    assert result["measured_bytes"] > 100 * 2**20  # well above the noise of a process
    assert 0.8 <= result["ratio"] <= 1.2, result


def test_an_8b_shaped_plan_on_two_virtual_devices():
    """Llama-3-8B widths (4 of its 32 layers, to keep the suite fast; the whole model plans in
    about 30 s, docs/memory.md) with FSDP over two virtual CPU devices: nothing allocated."""
    cmd = [sys.executable, "-m", "rlhf_jax.cli", "plan", "--config", CONFIG, *LLAMA_8B]
    cmd += ["model.n_layers=4", "pretrain.steps=0", "rm.steps=0", "ppo.iterations=0"]
    cmd += ["--devices", "2", "mesh.fsdp=2", "mesh.data=1", "--device-memory", "80GB", "--json"]
    out = run(cmd)
    assert out.returncode == 0, out.stderr
    sft = json.loads(out.stdout)["stages"]["sft"]
    d, f, kv, v = 4096, 14336, 8 * 128, 128256
    n_params = 4 * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * v * d + d
    assert sft["parts"]["params"] == pytest.approx(4 * n_params / 2, rel=1e-3)  # fp32, 2 shards
    assert sft["fits"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device-memory", "lots"], "--device-memory: 'lots' is not a size"),
        # a bare number was taken as bytes ("18258526% of memory"): a unit is required
        (["--device-memory", "80"], "--device-memory: '80' has no unit; write 80GB (10^9"),
        (["--device-memory", "1e999GB"], "'1e999GB' is not a device's memory; give between"),
        (["--device-memory", "80KB"], "'80KB' is not a device's memory"),
        (["--device-memory", "2PiB"], "--device-memory: '2PiB' is not a size"),
        (["--devices", "0"], "--devices must be >= 1"),
        (["model.path=/no/such/folder"], "/no/such/folder: checkpoint folder not found"),
        (["mesh.data=3", "mesh.fsdp=5"], "config section 'mesh'"),
        (["ppo.no_such_key=1"], "ppo.no_such_key"),
        (["sft.steps=0", "rm.steps=0", "ppo.iterations=0", "pretrain.steps=0"], "nothing to plan"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["plan", "--config", CONFIG, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_devices_once_jax_runs_is_refused(capsys):
    import jax

    n = jax.device_count() + 1  # started with other devices: can no longer change
    assert main(["plan", "--config", CONFIG, "--devices", str(n)]) == 2
    assert "run `rlhf-jax plan` in a fresh process" in capsys.readouterr().err
    assert jax.device_count() == n - 1


def test_measure_refuses_a_filtered_run_in_one_line():
    """`python -m rlhf_jax.plan.measure` on a stage it cannot measure (an RL run with rollout
    filters) exits 2 with the reason as one line, not a traceback."""
    cmd = [sys.executable, "-m", "rlhf_jax.plan.measure", "--config", CONFIG, "ppo"]
    filtered = ["ppo.samples_per_prompt=2", "ppo.rollout_filters=[{name: dynamic_sampling}]"]
    out = run([*cmd, *SMALL, *filtered], capture_output=True)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: config key 'ppo.rollout_filters': the measured check runs one unfiltered RL "
        "iteration; measure with ppo.rollout_filters=[]"
    ]
