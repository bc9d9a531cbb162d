"""The command line: generate from a local checkpoint, and clean exits on bad input."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, load_hf, save_hf
from rlhf_jax.rollout import generate
from rlhf_jax.tasks.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = train_tokenizer(
        ["the red fox runs near the river.", "a calm owl sings."] * 20, vocab_size=300
    )
    config = tiny_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("ckpt")
    save_hf(config, init_params(config, jax.random.key(0)), path, tokenizer)
    return path, tokenizer


def test_generate_prints_the_greedy_completion(checkpoint, capsys):
    path, tokenizer = checkpoint
    assert (
        main(["generate", "--model", str(path), "--prompt", "the red fox", "--max-new-tokens", "6"])
        == 0
    )
    printed = capsys.readouterr().out.strip()
    config, params = load_hf(path)
    ids = np.array([tokenizer("the red fox")["input_ids"]], np.int32)
    out = generate(
        config,
        params,
        ids,
        np.ones_like(ids),
        jax.random.key(0),
        6,
        temperature=0.0,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    tokens = np.asarray(out.tokens[0])[np.asarray(out.mask[0]) > 0]
    assert printed == tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_generate_batch_of_prompts(checkpoint, capsys):
    path, _ = checkpoint
    args = [
        "generate",
        "--model",
        str(path),
        "--prompt",
        "the red fox",
        "--prompt",
        "a calm",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("[0] ") and "\n[1] " in out


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["generate", "--model", "/nonexistent/ckpt", "--prompt", "x"],
            "checkpoint folder not found",
        ),
        (["pipeline", "--output", "/tmp/unused", "ppo.betta=1"], "did you mean 'ppo.beta'"),
        (["pipeline", "--output", "/dev/null/out"], "output folder /dev/null/out cannot be"),
        (
            ["pipeline", "--output", "/tmp/unused", "data.on_error=ignore"],
            "config key 'data.on_error': 'ignore' is not one of ['raise', 'skip']",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_generation_settings_exit_2(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["generate", "--model", str(path), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_a_folder_of_pickle_weights_is_refused_for_that_reason(checkpoint, tmp_path):
    """Even by commands that read the tokenizer first: the weights are checked before it."""
    checkpoint, _ = checkpoint
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n')
    args = ["sft", "--output", str(tmp_path / "o"), f"model.path={folder}", f"sft.data={data}"]
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "only pickle weights found (pytorch_model.bin)" in proc.stderr
