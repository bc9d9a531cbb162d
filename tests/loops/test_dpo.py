"""`rlhf-jax dpo` on the tiny pipeline's SFT policy and rankings: it trains and reports, resumes
exactly after a stop, skips and stops on NaN, and refuses bad input with one line."""

import json

import numpy as np
from test_resume import _interrupted_and_whole, _metrics, _same_weights

from rlhf_jax.cli import main

SMALL = ["log.every=1", "log.progress=false", "dpo.batch_size=8", "dpo.heldout_fraction=0.2"]


def _command(run_dir, *extra):
    return [
        "dpo",
        *SMALL,
        f"dpo.policy={run_dir / 'sft'}",
        f"dpo.data={run_dir / 'data' / 'rankings.jsonl'}",
        *extra,
    ]


def test_dpo_trains_reports_and_resumes_exactly(run_dir, fake_bucket, tmp_path, capsys):
    """The interrupted run writes to a gs:// URL (the fake bucket) and resumes from the
    checkpoint there; the uninterrupted one writes a local folder: the same numbers."""
    url = f"gs://rlhf-test/{tmp_path.name}-dpo"
    paused, whole = _interrupted_and_whole(
        _command(run_dir, "dpo.steps=4", "dpo.optim.lr=3e-3"),
        2,
        tmp_path,
        capsys,
        paused_at=(url, fake_bucket / "rlhf-test" / f"{tmp_path.name}-dpo"),
    )
    metrics = _metrics(paused, "dpo")
    assert sorted(metrics) == [1, 2, 3, 4]
    assert metrics == _metrics(whole, "dpo")
    _same_weights(paused / "policy" / "model.safetensors", whole / "policy" / "model.safetensors")
    first = metrics[1]
    for key in ("accuracy", "margin", "rewards_chosen", "logps_chosen", "logps_rejected"):
        assert np.isfinite(first[f"dpo/{key}"]), key
    # The first step starts at the reference: implicit rewards are zero, the loss is log 2.
    assert abs(first["dpo/margin"]) < 1e-4 and abs(first["dpo/loss"] - np.log(2)) < 1e-4
    assert metrics[4]["dpo/margin"] > 0  # the policy moved toward the preferred completions
    summary = json.loads((whole / "summary.json").read_text())
    assert 0 <= summary["heldout_accuracy"] <= 1 and np.isfinite(summary["heldout_kl_to_reference"])
    assert "dpo: resuming from step 2" in capsys.readouterr().out


def test_nan_updates_are_skipped_then_the_stage_stops(run_dir, tmp_path, capsys):
    code = main(
        [
            *_command(run_dir, "dpo.steps=5", "dpo.loss=faulty_losses:nan_preference"),
            "dpo.optim.max_consecutive_skips=2",
            "--output",
            str(tmp_path / "nan"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: dpo stopped at step 2: 2 updates in a row had NaN/Inf gradients" in err
    assert "Traceback" not in err


def test_bad_rankings_and_sizes_are_refused_with_one_line(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completions": ["x", "y"], "ranking": [0, 1]}\n'
                   '{"prompt": "b", "completions": ["x"], "ranking": [0]}\n')  # fmt: skip
    code = main([*_command(run_dir), f"dpo.data={bad}", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and "Traceback" not in err
    code = main([*_command(run_dir), "dpo.batch_size=4000", "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "config key 'dpo.batch_size' is 4000" in err
    assert "rankings.jsonl (less" in err
    code = main(
        [*_command(run_dir), "dpo.policy=" + str(run_dir / "rm"), "--output", str(tmp_path / "o3")]
    )
    assert code == 2 and "holds a reward model" in capsys.readouterr().err
