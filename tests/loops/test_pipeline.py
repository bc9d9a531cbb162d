"""The whole pipeline at a tiny size: every stage runs and leaves what a person looks at."""

import json
import os
import shutil

import pytest

from rlhf_jax.cli import main

TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.mlp_dim=64",
    "task.n_pretrain_texts=300",
    "task.n_demonstrations=120",
    "task.n_rm_prompts=48",
    "task.n_eval_prompts=16",
    "pretrain.steps=6",
    "sft.steps=6",
    "rm.steps=4",
    "rm.batch_size=8",
    "ppo.iterations=2",
    "ppo.rollout_batch=16",
    "ppo.minibatch_size=8",
    "ppo.epochs=1",
    "ppo.max_new_tokens=8",
    "ptx.batch_size=8",
    "eval.bootstrap=50",
    "log.every=2",
    "log.progress=false",
]


def test_report_has_the_promised_fields(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    for section, key in [
        ("sft", "gold_reward"),
        ("ppo", "gold_reward"),
        ("ppo", "win_rate_vs_sft"),
        ("ppo", "kl_to_sft"),
        ("rm", "heldout_accuracy"),
        ("pretrain_loss", "sft"),
        ("pretrain_loss", "ppo"),
        ("ablation", "no_ptx"),
    ]:
        assert key in report[section], (section, key)
    assert report["wall_seconds"] > 0
    assert 0.0 <= report["ppo"]["win_rate_vs_sft"] <= 1.0
    lo, hi = report["ppo"]["gold_reward_ci"]
    assert lo <= report["ppo"]["gold_reward"] <= hi


def test_run_leaves_checkpoints_metrics_and_a_picture(run_dir):
    for name in (
        "report.md",
        "curves.png",
        "metrics.jsonl",
        "run_config.json",
        "sft/config.json",
        "sft/model.safetensors",
        "sft/tokenizer.json",
        "policy/model.safetensors",
        "rm/model.safetensors",
        "data/rankings.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    stages = {json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").open()}
    assert stages == {"pretrain", "sft", "rm", "ppo", "ppo_no_ptx"}
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_saved_policy_generates_from_the_cli(run_dir, fake_bucket, capsys):
    """From the bucket: the model folder is downloaded to the cache first."""
    assert (
        main(
            [
                "generate",
                "--model",
                "gs://rlhf-test/run/policy",
                "--prompt",
                "story about a red fox:",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.endswith("\n") and not out.startswith("[0]")  # one prompt: one completion


STAGE_TINY = [
    "sft.steps=3",
    "rm.steps=3",
    "rm.batch_size=8",
    "ppo.iterations=2",
    "ppo.rollout_batch=16",
    "ppo.minibatch_size=8",
    "ppo.epochs=1",
    "ppo.max_new_tokens=8",
    "ptx.batch_size=8",
    "log.progress=false",
]


def test_single_stages_chain_on_user_files(run_dir, fake_bucket, tmp_path, monkeypatch):
    """sft -> rm -> ppo as separate commands, on the pipeline's own files and checkpoints,
    every input and output a gs:// URL (the fake bucket), from an empty working folder."""
    monkeypatch.chdir(tmp_path)
    data, out = "gs://rlhf-test/run/data", f"gs://rlhf-test/{tmp_path.name}"
    args = ["--output", out, *STAGE_TINY]
    sft = ["sft", *args, "model.path=gs://rlhf-test/run/sft", f"sft.data={data}/sft.jsonl"]
    assert main(sft) == 0
    assert (
        main(
            [
                "rm",
                *args,
                f"rm.init={out}/sft",
                f"rm.data={data}/rankings.jsonl",
                f"sft.data={data}/sft.jsonl",
            ]
        )
        == 0
    )
    written = fake_bucket / "rlhf-test" / tmp_path.name
    rm_config = json.loads((written / "rm" / "config.json").read_text())
    assert rm_config["architectures"][0].endswith("ForSequenceClassification")
    assert (
        main(
            [
                "ppo",
                *args,
                f"ppo.policy={out}/sft",
                f"ppo.reward_model={out}/rm",
                f"ppo.prompts={data}/ppo_prompts.jsonl",
                f"ptx.data={data}/pretrain.jsonl",
            ]
        )
        == 0
    )
    assert (written / "policy" / "model.safetensors").is_file()
    assert {"sft", "rm", "policy", "checkpoints", "metrics.jsonl"} <= set(os.listdir(written))
    assert os.listdir(tmp_path) == ["url-cache"]  # the downloads; no "gs:" folder


def test_stage_without_its_inputs_names_the_missing_key(tmp_path, capsys):
    assert main(["ppo", "--output", str(tmp_path)]) == 2
    assert "needs config key 'ppo.policy'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["the model folder", "its parent"])
def test_an_output_that_would_overwrite_the_input_model_is_refused(
    run_dir, tmp_path, where, capsys
):
    """`--output` equal to model.path (or writing OUT/sft into it) would replace the model
    being read; the folder is left byte for byte as it was."""
    model = tmp_path / "sft"
    shutil.copytree(run_dir / "sft", model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = model if where == "the model folder" else tmp_path
    data = run_dir / "data"
    code = main(
        ["sft", "--output", str(out), f"model.path={model}", f"sft.data={data / 'sft.jsonl'}"]
    )
    assert code == 2
    assert "the run would overwrite the model it reads" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_a_batch_larger_than_the_data_names_the_key_and_file(run_dir, tmp_path, capsys):
    """The first `rlhf-jax ppo` on a small prompt file (ppo.rollout_batch=64 by default) gets
    the key and the file, before any model is loaded."""
    prompts = tmp_path / "few.jsonl"
    prompts.write_text("".join('{"prompt": "story about a red fox:"}\n' for _ in range(16)))
    args = [
        "ppo",
        "--output",
        str(tmp_path / "out"),
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={prompts}",
        "ptx.coef=0",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"config key 'ppo.rollout_batch' is 64, but ppo.prompts {prompts} has only 16" in err
    assert not (tmp_path / "out").exists()


def test_a_reward_model_folder_is_not_taken_as_the_policy(run_dir, tmp_path, capsys):
    args = ["ppo", "--output", str(tmp_path / "o"), f"ppo.policy={run_dir / 'rm'}"]
    args += [
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={run_dir / 'data' / 'ppo_prompts.jsonl'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "config key 'ppo.policy'" in err
        and "holds a reward model (a sequence-classification" in err
    )


def test_a_model_folder_without_a_tokenizer_says_so(run_dir, tmp_path, capsys):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run_dir / "sft" / name, folder / name)
    data = run_dir / "data" / "sft.jsonl"
    assert (
        main(["sft", "--output", str(tmp_path / "o"), f"model.path={folder}", f"sft.data={data}"])
        == 2
    )
    err = capsys.readouterr().err
    assert f"{folder}: no tokenizer files" in err and "sentencepiece" not in err


def test_a_missing_data_file_in_the_bucket_is_one_line(run_dir, fake_bucket, tmp_path, capsys):
    args = ["sft", "--output", str(tmp_path / "o"), f"model.path={run_dir / 'sft'}"]
    assert main([*args, "sft.data=gs://rlhf-test/missing.jsonl"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data file gs://rlhf-test/missing.jsonl: no such file or folder"
    )
