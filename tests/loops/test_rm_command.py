"""`rlhf-jax rm` on user files: rm.heldout_fraction is honoured (not trained on, scored after),
a reward-model folder as the trunk is refused from its config.json before anything is created,
and no command writes outside --output."""

import json

import jax
import pytest
from tiny import tiny_config

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, save_hf, save_scalar_model
from rlhf_jax.models.heads import init_scalar_head
from rlhf_jax.tasks.tokenizer import train_tokenizer

TEXT = ["the red fox runs near the river.", "a calm owl sings by the lake."] * 20
COMPLETIONS = [" fox runs.", " owl sings.", " the lake", " a river"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_command")
    tokenizer = train_tokenizer(TEXT, vocab_size=300)
    config = tiny_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params = init_params(config, jax.random.key(0))
    save_hf(config, params, root / "lm", tokenizer)
    head = init_scalar_head(config, jax.random.key(1))
    save_scalar_model(config, {"trunk": params, "head": head}, root / "rm2", tokenizer)
    rm_config = json.loads((root / "rm2" / "config.json").read_text())  # a two-label classifier
    rm_config |= {"num_labels": 2, "id2label": {"0": "NEG", "1": "POS"}}
    (root / "rm2" / "config.json").write_text(json.dumps(rm_config))
    rows = [
        {"prompt": f"the red {i}", "completions": COMPLETIONS[:3],
         "ranking": [i % 3, (i + 1) % 3, (i + 2) % 3]}
        for i in range(20)
    ]  # fmt: skip
    (root / "ranks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = [{"prompt": "the red", "completion": " fox runs."}] * 8
    (root / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
    return root


def _rm(files, out, *extra):
    return main(
        ["rm", "--output", str(out), "log.progress=false", "rm.steps=2", f"rm.init={files / 'lm'}",
         f"rm.data={files / 'ranks.jsonl'}", "rm.max_prompt_len=8", "rm.max_completion_len=8",
         *extra]
    )  # fmt: skip


def test_rm_refuses_a_batch_larger_than_what_heldout_fraction_leaves(files, tmp_path, capsys):
    # 20 prompts, 0.25 held out: 15 left to train on, fewer than a batch of 16
    assert _rm(files, tmp_path / "a", "rm.heldout_fraction=0.25", "rm.batch_size=16") == 2
    err = capsys.readouterr().err
    assert "(less 5 held out)" in err and "rm.batch_size" in err
    # The run that trains on the other 15 is test_a_stage_command_writes_only_inside_its_output's
    # (one real rm run for both).


def test_a_stage_command_writes_only_inside_its_output(files, tmp_path, monkeypatch, capsys):
    """Inputs untouched, nothing beside the output folder (run from an empty working folder
    inside tmp_path, with relative paths), everything the run wrote under --output; the run
    holds out rm.heldout_fraction of the prompts and scores them after training."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {p: p.stat().st_mtime_ns for p in files.rglob("*")}
    held_out = ("rm.heldout_fraction=0.25", "rm.batch_size=5")
    assert _rm(files, "out", *held_out, f"sft.data={files / 'demos.jsonl'}") == 0
    assert [p.name for p in cwd.iterdir()] == ["out"]
    assert {p: p.stat().st_mtime_ns for p in files.rglob("*")} == before
    assert list(tmp_path.iterdir()) == [cwd]
    assert (cwd / "out" / "rm" / "model.safetensors").is_file()
    summary = json.loads((cwd / "out" / "summary.json").read_text())
    assert 0 <= summary["heldout_pairwise_accuracy"] <= 1
    assert 0 <= summary["train_pairwise_accuracy"] <= 1
    assert "heldout pairwise accuracy:" in capsys.readouterr().out


def test_a_reward_model_as_the_trunk_is_refused_before_anything(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _rm(files, out, f"rm.init={files / 'rm2'}", "rm.batch_size=4") == 2
    err = capsys.readouterr().err
    assert f"error: config key 'rm.init': {files / 'rm2'} holds a reward model" in err
    assert not out.exists()


def test_plan_refuses_the_folders_the_commands_refuse(files, capsys):
    for key in ("model.path", "ppo.policy"):
        assert main(["plan", f"{key}={files / 'rm2'}"]) == 2
        assert (
            f"config key '{key}': {files / 'rm2'} holds a reward model" in capsys.readouterr().err
        )


def test_rm_pack_trains_on_packed_rows_and_refuses_too_few(files, tmp_path, capsys):
    """With rm.pack a batch is rm.batch_size packed rows, each holding several prompts (all of
    their 3 ranked completions, 3 pairs per prompt); a batch larger than the packed rows is
    refused in one line naming rm.pack."""
    assert _rm(files, tmp_path / "few", "rm.pack=true", "rm.batch_size=16") == 2
    err = capsys.readouterr().err
    assert "rm.batch_size" in err and "packed by rm.pack" in err and "Traceback" not in err
    out = tmp_path / "packed"
    assert _rm(files, out, "rm.pack=true", "rm.batch_size=2", "log.every=1") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    pairs = [r["rm/pairs"] for r in rows if r.get("stage") == "rm" and "rm/pairs" in r]
    assert len(pairs) == 2
    # 2 unpacked prompts would make 6 pairs; 2 packed rows hold more prompts than that.
    assert all(p % 3 == 0 and p > 6 for p in pairs), pairs
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["heldout_pairwise_accuracy"] <= 1
