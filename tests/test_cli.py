"""The command line: generate from a local checkpoint, and clean exits on bad input."""

import sys

import jax
import numpy as np
import pytest
from processes import Process, run
from tiny import tiny_config, tiny_hf_checkpoint

from rlhf_jax.cli import main
from rlhf_jax.models import init_params, load_hf, save_hf
from rlhf_jax.rollout import generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_hf_checkpoint(tmp_path_factory.mktemp("ckpt"))


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
    proc = run([sys.executable, "-m", "rlhf_jax.cli", *args])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--temperature", "nan", "--temperature must be >= 0, got nan"),
        ("--temperature", "-0.5", "--temperature must be >= 0, got -0.5"),
        ("--temperature", "inf", "--temperature must be >= 0, got inf"),
        ("--top-p", "2", "--top-p must be in (0, 1], got 2.0"),
        ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
        ("--top-k", "0", "--top-k must be >= 1, got 0"),
        ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
        ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
        ("--seed", "4294967296", "--seed must be in [0, 4294967295], got 4294967296"),
    ],
)
def test_every_numeric_flag_is_range_checked_in_one_line(checkpoint, capsys, flag, value, message):
    path, _ = checkpoint
    assert main(["generate", "--model", str(path), "--prompt", "x", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""


def test_plan_flags_are_range_checked_too(capsys):
    assert main(["plan", "--devices", "0"]) == 2
    assert capsys.readouterr().err == "error: --devices must be >= 1, got 0\n"


def test_every_numeric_flag_is_declared_with_a_range():
    """The class, not the examples: every int/float option of every command goes through
    `flags.add_number` (so none can take NaN or a value its command cannot use)."""
    from rlhf_jax.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    unchecked = [
        f"{name} {action.option_strings[0]}"
        for name, sub in commands.items()
        for action in sub._actions
        if action.type in (int, float) and not hasattr(action, "allowed")
    ]
    assert not unchecked, f"numeric flags without a range: {unchecked}"


@pytest.mark.parametrize("temperature", ["1e-12", "1e-30", "1e-39", "1e-300"])
def test_a_tiny_temperature_gives_the_greedy_completion(checkpoint, capsys, temperature):
    """Not an empty completion (EOS drawn with log-prob -inf, as at 1e-12 before)."""
    path, _ = checkpoint
    base = ["generate", "--model", str(path), "--prompt", "the red fox", "--max-new-tokens", "6"]
    assert main(base) == 0
    greedy = capsys.readouterr().out
    assert greedy.strip()
    assert main([*base, "--temperature", temperature]) == 0
    assert capsys.readouterr().out == greedy


def test_generate_checks_the_tokenizer_against_the_model(checkpoint, tmp_path, capsys):
    """A model whose vocabulary is smaller than its tokenizer's: refused, as training does."""
    _, tokenizer = checkpoint
    config = tiny_config(vocab_size=100, eos_token_id=tokenizer.eos_token_id)
    save_hf(config, init_params(config, jax.random.key(0)), tmp_path / "small", tokenizer)
    assert main(["generate", "--model", str(tmp_path / "small"), "--prompt", "the red"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {tmp_path / 'small'}: the tokenizer has {len(tokenizer)} tokens (ids up to "
        f"{len(tokenizer) - 1}), but the model's vocabulary has 100 entries (vocab_size in its "
        "config.json): the tokenizer does not belong to this model; use the tokenizer saved "
        "with it\n"
    )


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
    proc = run([sys.executable, "-m", "rlhf_jax.cli", *args])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "only pickle weights found (pytorch_model.bin)" in proc.stderr


def test_a_truncated_weights_file_is_named(checkpoint, tmp_path, capsys):
    """An interrupted download or copy: the file and the likely cause, no SafetensorError."""
    import shutil

    path, _ = checkpoint
    folder = tmp_path / "truncated"
    shutil.copytree(path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["generate", "--model", str(folder), "--prompt", "the red fox"]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: not a readable safetensors file" in err and "truncated" in err


# `rlhf-jax ARGS` run by its real `main`, saying on stderr when generation starts: the moment
# to signal a long `generate` (nothing observable happens there otherwise).
ANNOUNCING_GENERATE = """
import sys
import rlhf_jax.rollout
from rlhf_jax.cli import main

real = rlhf_jax.rollout.generate
def announcing(*args, **kwargs):
    print("test: generating", file=sys.stderr, flush=True)
    return real(*args, **kwargs)
rlhf_jax.rollout.generate = announcing
sys.exit(main(sys.argv[1:]))
"""


def _signal_once(cmd, ready_line, sig):
    """Start CMD, send `sig` once it printed `ready_line` on stderr; (returncode, stderr)."""
    with Process(cmd) as proc:
        proc.wait_for_line(ready_line)
        proc.send_signal(sig)
        return proc.finish(), proc.stderr


def test_generate_stops_on_sigterm_and_ctrl_c(checkpoint):
    """Only training commands turn SIGTERM/SIGINT into 'save and stop at the next step';
    generate (here a long one) ends at once, as schedulers and IDE stop buttons expect."""
    import signal

    path, _ = checkpoint
    args = ["generate", "--model", str(path), "--prompt", "the red fox", "--max-new-tokens", "5000"]
    cmd = [sys.executable, "-c", ANNOUNCING_GENERATE, *args]
    for sig in (signal.SIGTERM, signal.SIGINT):
        # sent while compiling or decoding, long before the tokens could be done
        code, err = _signal_once(cmd, "test: generating", sig)
        assert code in (-sig, 130), err  # 130: Ctrl-C while Python was still importing
        assert "Traceback" not in err


def test_sigterm_stops_a_run_waiting_for_other_processes(tmp_path):
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "sft",
        "--output",
        str(tmp_path / "out"),
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
        "distributed.process_id=0",
    ]
    cmd = [sys.executable, "-m", "rlhf_jax.cli", *args]
    # said just before the wait for process 1, which never comes
    code, err = _signal_once(cmd, "waiting until all 2 processes have joined", signal.SIGTERM)
    assert code == -signal.SIGTERM
    assert "process 0 of 2: joining the run at 127.0.0.1" in err
    assert "waiting until all 2 processes have joined" in err


def test_transformers_advice_is_silenced_on_the_command_line(tmp_path):
    """A torch-free install gets transformers' 'PyTorch was not found' advice on import, which
    made every one-line error two lines; the CLI turns advisory messages off."""
    code = (
        "import sys\n"
        "from rlhf_jax.cli import main\n"
        "main(['generate', '--model', sys.argv[1], '--prompt', 'x'])\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('transformers').warning_advice('ADVICE-LINE')\n"
    )
    proc = run([sys.executable, "-c", code, str(tmp_path / "missing")])
    assert "checkpoint folder not found" in proc.stderr
    assert "ADVICE-LINE" not in proc.stderr
