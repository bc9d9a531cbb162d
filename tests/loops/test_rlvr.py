"""The RLVR pipeline (task sums, GRPO on sums_exact) at a tiny size: the stages it runs, what
it leaves, and a report whose numbers hang together (not what the tiny run learned)."""

import json
import math
from pathlib import Path

import pytest
from run_once import once_per_run
from scipy.stats import binomtest

from rlhf_jax.cli import main

CONFIG = str(Path(__file__).parents[2] / "configs" / "rlvr_quickstart.yaml")
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.mlp_dim=64",
    "task.n_pretrain_texts=300",
    "task.n_demonstrations=120",
    "task.n_eval_prompts=24",
    "pretrain.steps=0",  # one compile less; the stages after it are what this tests
    "sft.steps=6",
    "ppo.iterations=2",
    "ppo.rollout_batch=4",
    "ppo.samples_per_prompt=4",
    "ppo.minibatch_size=8",
    "ppo.max_new_tokens=10",
    "eval.bootstrap=200",
    "log.every=1",
    "log.progress=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Read only; built once per pytest run, even when xdist splits this file's tests."""

    def build(folder):
        assert main(["pipeline", "--config", CONFIG, "--output", str(folder / "run"), *TINY]) == 0

    out = once_per_run(tmp_path_factory, "rlvr", build) / "run"
    return out, json.loads((out / "report.json").read_text())


def test_runs_sft_then_grpo_without_a_reward_model(run):
    out, _ = run
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").open()}
    assert stages == {"sft", "grpo"}  # pretraining has 0 steps here
    for name in ("report.md", "curves.png", "sft/model.safetensors", "policy/model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "rm").exists()
    assert not (out / "data" / "rankings.jsonl").exists()


def test_report_intervals_are_coherent(run):
    _, report = run
    sft, grpo = report["sft"], report["grpo"]
    for policy in (sft, grpo):
        n = policy["n_prompts"]
        assert n == 24
        k = round(policy["accuracy"] * n)
        assert policy["accuracy"] == pytest.approx(k / n)
        # the Wilson 95% interval, against SciPy's
        want = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert policy["accuracy_ci"] == pytest.approx([want.low, want.high], abs=1e-6)
        assert 0.0 <= policy["format_rate"] <= 1.0
        # an exact answer is a formatted one
        assert policy["format_rate"] >= policy["accuracy"]
    # paired over the same prompts: the mean difference is the difference of the means
    assert grpo["gain"] == pytest.approx(grpo["accuracy"] - sft["accuracy"])
    lo, hi = grpo["gain_ci"]
    assert -1.0 <= lo <= grpo["gain"] <= hi <= 1.0
    assert "bootstrap" in grpo["gain_ci_method"]
    assert math.isfinite(grpo["kl_to_sft"])
    assert report["rl"]["reward_fn"] == "sums_exact"
    assert report["wall_seconds"] > 0


def test_samples_are_held_out_prompts(run):
    out, report = run
    held = {json.loads(line)["prompt"] for line in (out / "data" / "eval_prompts.jsonl").open()}
    assert report["samples"] and all(s["prompt"] in held for s in report["samples"])
    assert "exact accuracy" in (out / "report.md").read_text()


def test_a_verifiable_task_without_a_reward_function_is_refused(tmp_path, capsys):
    args = ["pipeline", "--config", CONFIG, "--output", str(tmp_path / "o"), "ppo.reward_fn=null"]
    assert main([*args, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "set ppo.reward_fn" in err
