"""Data against the model, before anything runs: token ids past the vocabulary, sequences past
a learned position table (refused) or a RoPE model's trained length (a warning), and a stage
whose every update was skipped (an error, not a saved untrained model)."""

import json
from pathlib import Path

import jax
import pytest
from tiny import tiny_config

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, save_hf
from rlhf_jax.models.config import FAMILY_SWITCHES
from rlhf_jax.tasks.tokenizer import train_tokenizer

TEXT = ["the red fox runs near the river.", "a calm owl sings by the lake."] * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_checks")
    tokenizer = train_tokenizer(TEXT, vocab_size=300)
    data = root / "sft.jsonl"
    rows = [{"prompt": "the red", "completion": " fox runs near the river."}] * 16
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def model(name, **changes):
        base = dict(
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = tiny_config(**(base | changes))
        path = root / name
        save_hf(config, init_params(config, jax.random.key(0)), path, tokenizer)
        return path

    return {
        "data": data,
        "small_vocab": model("small_vocab", vocab_size=100),
        "gpt2": model(
            "gpt2",
            model_type="gpt2",
            n_kv_heads=4,
            max_position_embeddings=16,
            **FAMILY_SWITCHES["gpt2"],
        ),
        "rope": model("rope", max_position_embeddings=16),
        "fine": model("fine"),
    }


def _sft(files, model, out, *extra):
    return main(
        [
            "sft",
            "--output",
            str(out),
            "log.progress=false",
            "sft.steps=2",
            "sft.batch_size=4",
            "sft.max_len=24",
            f"model.path={files[model]}",
            f"sft.data={files['data']}",
            *extra,
        ]
    )


def test_token_ids_past_the_vocabulary_are_refused(files, tmp_path, capsys):
    assert _sft(files, "small_vocab", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "but the model's vocabulary has 100 entries" in err
    assert "the tokenizer does not belong to this model" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_learned_position_table_is_not_overrun(files, tmp_path, capsys):
    assert _sft(files, "gpt2", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "learned position table has 16 positions" in err and "sft.max_len = 24" in err
    assert _sft(files, "gpt2", tmp_path / "ok", "sft.max_len=16") == 0


def test_rope_past_its_trained_length_is_a_warning(files, tmp_path, capsys):
    assert _sft(files, "rope", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "trained on 16 positions, but sft.max_len = 24" in err


def test_a_stage_that_skipped_every_update_saves_nothing(files, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # faulty_losses.py
    code = _sft(files, "fine", tmp_path / "out", "sft.loss=faulty_losses:always_nan")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "every one of its 2 updates had NaN/Inf gradients and was skipped" in err
    assert not (tmp_path / "out" / "sft").exists()


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo", "pipeline", "generate"])
def test_every_command_that_reads_a_model_checks_its_tokenizer(files, tmp_path, command, capsys):
    """One check (`check_tokenizer`) in every command that reads a model and its tokenizer:
    a tokenizer with ids past the model's vocabulary is refused before anything is written."""
    ranks = tmp_path / "ranks.jsonl"
    row = {"prompt": "the red", "completions": [" fox", " owl"], "ranking": [0, 1]}
    ranks.write_text((json.dumps(row) + "\n") * 8)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the red {i}"}) + "\n" for i in range(8)))
    model = str(files["small_vocab"])
    out = ["--output", str(tmp_path / "out"), "log.progress=false"]
    args = {
        "sft": ["sft", *out, f"model.path={model}", f"sft.data={files['data']}"],
        "rm": ["rm", *out, f"rm.init={model}", f"rm.data={ranks}", "rm.batch_size=4"],
        "dpo": ["dpo", *out, f"dpo.policy={model}", f"dpo.data={ranks}", "dpo.batch_size=4"],
        "ppo": ["ppo", *out, f"ppo.policy={model}", f"ppo.prompts={prompts}", "ptx.coef=0",
                "ppo.reward_fn=topics_gold", "ppo.rollout_batch=4", "ppo.minibatch_size=4"],
        "pipeline": ["pipeline", *out, f"model.path={model}", f"sft.data={files['data']}",
                     f"ppo.prompts={prompts}", "ptx.coef=0", "ppo.rollout_batch=4",
                     "ppo.minibatch_size=4", f"rm.data={ranks}", "rm.batch_size=2",
                     "ppo.max_prompt_len=200", "rm.max_prompt_len=200"],
        "generate": ["generate", "--model", model, "--prompt", "the red"],
    }[command]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}: the tokenizer has ") and err.count("\n") == 1
    assert "but the model's vocabulary has 100 entries" in err
    assert not (tmp_path / "out" / "sft").exists() and not (tmp_path / "out" / "policy").exists()
