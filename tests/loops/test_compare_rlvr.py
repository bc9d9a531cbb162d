"""`rlhf-jax compare` on the sums task at a tiny size (2 rows x 2 seeds): the report's keys,
its means and Student-t intervals (clipped to an accuracy's [0, 1]) recomputed with
NumPy/SciPy from the per-seed values, each seed's accuracy against the per-prompt answers it
gave, and that no reward model was trained."""

import json
from pathlib import Path

import numpy as np
import pytest
from run_once import once_per_run
from scipy import stats
from seed_intervals import check_t_interval
from test_rlvr import TINY

from rlhf_jax.cli import main

CONFIG = str(Path(__file__).parents[2] / "configs" / "compare_rlvr.yaml")
ROWS = (
    "compare.algorithms={ppo: {}, grpo: {advantage: grpo, samples_per_prompt: 2, "
    "rollout_batch: 4, kl_penalty: loss}}"
)
KEYS = ("accuracy", "format_rate", "kl_to_sft", "wall_seconds", "gain", "lenient_accuracy")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Read only; built once per pytest run, even when xdist splits this file's tests."""
    changed = ("ppo.rollout_batch", "ppo.samples_per", "ppo.iterations", "task.n_eval")
    tiny = [a for a in TINY if not a.startswith(changed)]

    def build(folder):
        args = ["compare", "--config", CONFIG, "--output", str(folder / "run"), *tiny, ROWS]
        args += ["compare.seeds=2", "ppo.rollout_batch=8", "ppo.iterations=1"]
        assert main([*args, "task.n_eval_prompts=16"]) == 0

    out = once_per_run(tmp_path_factory, "compare_rlvr", build) / "run"
    return out, json.loads((out / "report.json").read_text())


def test_no_reward_model_stage(run):
    out, _ = run
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").open()}
    assert stages == {"sft", "rl_ppo", "rl_ppo.seed1", "rl_grpo", "rl_grpo.seed1"}
    assert not (out / "rm").exists()
    assert not (out / "data" / "rankings.jsonl").exists()


def test_report_keys_and_t_intervals(run):
    out, report = run
    assert report["seeds"] == 2 and "Student-t" in report["interval"]
    sft = report["sft"]
    n = sft["n_prompts"]
    k = round(sft["accuracy"] * n)
    want = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert sft["accuracy_ci"] == pytest.approx([want.low, want.high], abs=1e-6)
    assert set(report["algorithms"]) == {"ppo", "grpo"}  # no gold twins on sums
    for name, row in report["algorithms"].items():
        for key in ("accuracy", "accuracy_ci", "format_rate", "kl_to_sft", "wall_seconds",
                    "peak_device_mib"):  # fmt: skip
            assert key in row, (name, key)
        for key in KEYS:
            values = row[f"{key}_seeds"]
            assert len(values) == 2
            assert row[key] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-12)
            check_t_interval(row, key, name)
        for acc, gain in zip(row["accuracy_seeds"], row["gain_seeds"]):
            assert acc * n == pytest.approx(round(acc * n))  # k of n greedy answers
            assert gain == pytest.approx(acc - sft["accuracy"])  # paired over the same prompts
        assert row["setup"]["critic"] == ("yes" if name == "ppo" else "no")
        assert row["reward"] == "sums_exact"
        assert (out / "policies" / f"{name}.seed1" / "model.safetensors").is_file()
    assert (out / "accuracy_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "t-interval, 2 seeds" in (out / "report.md").read_text()


def test_gold_twins_refused_on_sums(tmp_path, capsys):
    args = ["compare", "--config", CONFIG, "--output", str(tmp_path / "x")]
    assert main([*args, "compare.reward_fn=sums_format"]) == 2
    err = capsys.readouterr().err
    assert "compare.reward_fn" in err and "Traceback" not in err
