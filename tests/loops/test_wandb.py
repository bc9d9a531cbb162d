"""`log.wandb=true`: the one host loop's metrics also go to Weights & Biases (offline here)."""

import json

from rlhf_jax.cli import main


def test_stage_metrics_reach_an_offline_wandb_run(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    code = main(
        [
            "sft",
            "--output",
            str(out),
            "log.every=1",
            "log.progress=false",
            "log.wandb=true",
            "log.wandb_name=tiny-sft",
            "sft.steps=2",
            f"model.path={run_dir / 'sft'}",
            f"sft.data={run_dir / 'data' / 'sft.jsonl'}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    # run.finish() returns once W&B's service has the run's last record, not once the service
    # has closed the offline file: under load the file held only its header when read. Wait
    # for that event as W&B documents it (teardown waits for every run's data to be written).
    import wandb

    wandb.teardown()
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    # Each stage logs against its own step axis, every key under the stage's name.
    for key in (b"sft/step", b"sft/sft/loss", b"sft/train/grad_norm", b"tiny-sft"):
        assert key in data, key
    last = [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]
    assert json.dumps(last["sft/loss"]).encode() in data  # the same value as metrics.jsonl
