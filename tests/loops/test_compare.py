"""`rlhf-jax compare` at a tiny size: the shipped config's shape, the report's promised keys,
the plot, the same folder at two seeds, and a name typo inside compare.algorithms caught at
load."""

import json

from test_compare_seeds import check_one_seed, check_two_seeds, compare_args

from rlhf_jax.cli import main
from rlhf_jax.config import Config, compare_runs, load_config


def test_shipped_compare_config_budgets():
    """Every run of configs/compare.yaml samples the same responses and takes the same
    number of updates; each algorithm runs twice (reward model, then gold reward)."""
    cfg = load_config(Config, "configs/compare.yaml")
    runs = compare_runs(cfg)
    assert set(runs) == {
        f"{name}{suffix}"
        for name in ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "dapo_dynamic")
        for suffix in ("", "_gold")
    }
    episodes = {r.ppo.episodes * r.ppo.iterations for r in runs.values()}
    updates = {
        r.ppo.iterations * r.ppo.epochs * r.ppo.episodes // r.ppo.minibatch_size
        for r in runs.values()
    }
    assert len(episodes) == 1 and len(updates) == 1
    assert runs["grpo_gold"].ppo.reward_fn == "topics_gold" and runs["grpo"].ppo.reward_fn is None


def test_compare_writes_the_table_the_json_and_the_plot(fake_bucket, tmp_path, capsys):
    """Written to a gs:// URL (the fake bucket); the rerun restores from the checkpoints there.
    Then the same folder at two seeds: seed 0 restored, seed 1 trained (the one run that
    tests/loops/test_compare_seeds.py's checks read)."""
    out = fake_bucket / "rlhf-test" / f"{tmp_path.name}-compare"
    args = compare_args(f"gs://rlhf-test/{tmp_path.name}-compare")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "grpo_gold: gold" in printed
    report = json.loads((out / "report.json").read_text())
    assert isinstance(report["sft"]["gold_reward"], float)
    assert set(report["algorithms"]) == {"grpo", "grpo_gold", "dpo"}
    for name, row in report["algorithms"].items():
        for key in ("gold_reward", "gold_reward_ci", "win_rate_vs_sft", "kl_to_sft"):
            assert key in row
        assert row["wall_seconds"] > 0 and row["peak_device_mib"] > 0, name
        lo, hi = row["gold_reward_ci"]
        assert lo <= row["gold_reward"] <= hi
    assert report["algorithms"]["grpo_gold"]["reward"] == "topics_gold"
    assert report["eval"] == {"prompts": 16, "samples_per_prompt": 2}
    assert (out / "gold_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "report.md").read_text()
    assert "| grpo_gold | topics_gold |" in markdown and "| dpo | rankings (offline) |" in markdown
    assert 0 <= report["algorithms"]["dpo"]["heldout_pair_accuracy"] <= 1
    assert (out / "policies" / "dpo" / "model.safetensors").exists()
    assert (out / "policies" / "grpo" / "model.safetensors").is_file()
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").open()}
    assert {"rl_grpo", "rl_grpo_gold"} <= stages
    assert report["algorithms"]["grpo"]["setup"]["critic"] == "no"
    # A rerun restores every row from its checkpoints without a training step: the report
    # still describes each row whole (its time, memory and skipped updates), not the rerun.
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert set(again["algorithms"]) == set(report["algorithms"])
    for name, row in report["algorithms"].items():
        for key in ("wall_seconds", "peak_device_mib", "setup", "gold_reward"):
            assert again["algorithms"][name][key] == row[key], (name, key)
    rows = {"rl_grpo", "rl_grpo_gold", "dpo_dpo"}
    skipped = report["training"]["skipped_updates"]
    assert rows <= set(skipped)
    assert {k: again["training"]["skipped_updates"][k] for k in rows} == {
        k: skipped[k] for k in rows
    }
    check_one_seed(report, out)
    assert main([*args, "compare.seeds=2"]) == 0
    check_two_seeds(report, json.loads((out / "report.json").read_text()), out)


def test_a_typo_in_an_algorithm_fails_at_load(tmp_path, capsys):
    out = tmp_path / "c"
    bad = "compare.algorithms={x: {advantage: grop, samples_per_prompt: 2, rollout_batch: 32}}"
    assert main(["compare", "--output", str(out), bad]) == 2
    err = capsys.readouterr().err
    assert "unknown advantage estimator 'grop'" in err and "compare.algorithms.x" in err
    assert not out.exists()
    assert main(["compare", "--output", str(out), "compare.algorithms={x: {sampels: 2}}"]) == 2
    assert "'compare.algorithms.x.sampels' is unknown" in capsys.readouterr().err
