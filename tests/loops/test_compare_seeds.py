"""`compare.seeds`: a one-seed run, then the same output folder at two seeds (seed 0 restored
from its checkpoints, seed 1 trained). The two-seed report's means and intervals are
recomputed here with NumPy and SciPy from its per-seed values, and its seed-0 values are the
one-seed report's numbers. The runs are test_compare.py's (one compare, its rerun, then two
seeds, in one folder): `check_one_seed` and `check_two_seeds` are what it checks of them. (A
preference row takes the same path, compare_seeds.seeded and label; only the one-seed checks
read it.)"""

import json

import numpy as np
import pytest
from seed_intervals import check_t_interval, t_interval
from test_pipeline import TINY

from rlhf_jax.cli import main
from rlhf_jax.loops.compare_seeds import combine

METRICS = ("gold_reward", "gold_gain", "win_rate_vs_sft", "kl_to_sft")


def compare_args(output: str, *extra: str) -> list[str]:
    """A tiny `rlhf-jax compare` of configs/compare.yaml: one GRPO row (and its gold twin) and
    one DPO row of 3 steps, from the same foundation."""
    return [
        "compare",
        "--config",
        "configs/compare.yaml",
        "--output",
        output,
        *(a for a in TINY if not a.startswith("ptx.")),  # compare.yaml: ptx off, so unread
        "ppo.rollout_batch=8",
        "eval.n_samples=2",
        "compare.algorithms={grpo: {advantage: grpo, samples_per_prompt: 2, rollout_batch: 4, "
        "kl_penalty: loss}}",
        "compare.preference={dpo: {steps: 3, batch_size: 8}}",
        *extra,
    ]


def check_one_seed(one: dict, out) -> None:
    """A one-seed report: bootstrap intervals over prompts, no per-seed values."""
    assert one["seeds"] == 1 and "bootstrap" in one["interval"]
    for row in one["algorithms"].values():
        assert not [k for k in row if k.endswith("_seeds")]
        lo, hi = row["gold_reward_ci"]
        assert lo <= row["gold_reward"] <= hi
    assert "[bootstrap CI]" in (out / "report.md").read_text()


def check_two_seeds(one: dict, two: dict, out) -> None:
    """The report of the same folder at two seeds, against the one-seed report `one`."""
    assert two["seeds"] == 2 and "Student-t" in two["interval"]
    assert two["sft"] == one["sft"]  # one SFT policy, evaluated once, for every seed
    for name in ("grpo",):
        row, single = two["algorithms"][name], one["algorithms"][name]
        assert row["seeds"] == 2
        for key in METRICS + ("wall_seconds",):
            values = row[f"{key}_seeds"]
            assert len(values) == 2
            assert values[0] == single[key], (name, key)  # seed 0 is the one-seed run
            assert row[key] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-12)
            check_t_interval(row, key, name)
        # seed 1 sampled with other keys: its numbers are its own
        assert any(row[f"{k}_seeds"][0] != row[f"{k}_seeds"][1] for k in METRICS), name
        assert row["peak_device_mib"] == max(row["peak_device_mib_seeds"])
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").open()}
    assert "rl_grpo.seed1" in stages
    assert (out / "policies" / "grpo.seed1" / "model.safetensors").is_file()
    assert (out / "gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "report.md").read_text()
    assert "[t-interval, 2 seeds]" in markdown and "Student-t interval across seeds" in markdown


def test_combine_by_hand():
    """Three seeds: mean 2, sample sd 1, half-width t_{0.975,2} / sqrt(3) = 4.303 / 1.732."""
    rows = [
        {"gold_reward": v, "gold_reward_ci": (0.0, 9.0), "peak_device_mib": m, "setup": {"s": i}}
        for i, (v, m) in enumerate([(1.0, 10.0), (2.0, None), (3.0, 12.0)])
    ]
    row = combine(rows)
    half = 4.303 / np.sqrt(3)
    assert row["gold_reward"] == 2.0 and row["gold_reward_seeds"] == [1.0, 2.0, 3.0]
    assert row["gold_reward_ci"] == pytest.approx((2.0 - half, 2.0 + half))
    assert row["peak_device_mib"] == 12.0 and row["setup"] == {"s": 0} and row["seeds"] == 3
    assert combine(rows[:1]) == rows[0]  # one seed: the row itself, its bootstrap interval


def test_a_shares_interval_stays_within_zero_and_one():
    """Accuracies 0.9, 1.0, 1.0: the t interval's upper bound 1.124 is no accuracy; reported
    1.0. The KL keeps its interval as computed (an estimate can fall below 0)."""
    rows = [
        {"accuracy": a, "gain": g, "kl_to_sft": k}
        for a, g, k in [(0.9, -0.95, 0.01), (1.0, -1.0, 0.02), (1.0, -1.0, 0.0)]
    ]
    row = combine(rows)
    lo, hi = t_interval([0.9, 1.0, 1.0])
    assert hi > 1.1 and row["accuracy_ci"] == pytest.approx((lo, 1.0), abs=1e-3)
    assert row["accuracy"] == pytest.approx(29 / 30)
    assert row["gain_ci"][0] == -1.0 and row["gain_ci"][1] < -0.9
    assert row["kl_to_sft_ci"][0] < 0


def test_bad_seed_counts_fail_with_the_key(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(compare_args(str(out), "compare.seeds=0")) == 2
    assert "compare.seeds" in capsys.readouterr().err
    assert main(compare_args(str(out), "compare.seeds=3", f"seed={2**32 - 2}")) == 2
    err = capsys.readouterr().err
    assert "compare.seeds" in err and "4294967296" in err
    assert not (out / "checkpoints").exists()
