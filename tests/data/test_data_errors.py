"""A corpus of malformed files (tests/data/bad/): each gives one error naming file, line, field."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.data import load_prompts, load_rankings, load_sft, load_texts
from rlhf_jax.errors import RlhfJaxError

BAD = Path(__file__).parent / "bad"
LOADERS = {"sft": load_sft, "rank": load_rankings, "prompts": load_prompts, "text": load_texts}

# file -> (line or None, text the message must contain)
EXPECTED = {
    "sft_bad_json.jsonl": (2, "malformed JSON"),
    "sft_wrong_type.jsonl": (1, "field 'prompt': expected a string, got number"),
    "sft_missing_field.jsonl": (2, "field 'completion': missing"),
    "sft_extra_field.jsonl": (1, "field 'score': unknown field"),
    "sft_empty_string.jsonl": (1, "field 'prompt': empty or whitespace-only string"),
    "sft_non_utf8.jsonl": (1, "not valid UTF-8"),
    "sft_not_object.jsonl": (1, "not a JSON object"),
    "sft_empty.jsonl": (None, "empty file"),
    "sft_blank_only.jsonl": (None, "empty file"),
    "sft_chat_last_not_assistant.jsonl": (1, "the last message must be the assistant's"),
    "sft_chat_bad_role.jsonl": (1, "field 'messages[0].role'"),
    "rank_not_permutation.jsonl": (1, "field 'ranking': not a permutation of 0..2"),
    "rank_k_one.jsonl": (1, "field 'completions': need 2..9 completions, got K = 1"),
    "rank_k_ten.jsonl": (1, "got K = 10"),
    "rank_duplicate.jsonl": (1, "field 'completions': completions 0 and 1 are identical"),
    "rank_ties.jsonl": (1, "field 'ranks'"),
    "rank_wrong_type.jsonl": (1, "field 'ranking': expected an array of integers"),
    "rank_pair_empty.jsonl": (1, "field 'rejected'"),
    "prompts_extra_field.jsonl": (1, "field 'id': unknown field"),
    "prompts_duplicate_key.jsonl": (1, "duplicate key 'prompt'"),
    "text_null.jsonl": (1, "field 'text': expected a string, got null"),
    "text_nan.jsonl": (1, "NaN is not valid JSON"),
}


def test_every_bad_file_is_covered():
    assert {p.name for p in BAD.glob("*.jsonl")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_error_names_file_line_and_field(name):
    line, text = EXPECTED[name]
    loader = LOADERS[name.split("_")[0]]
    with pytest.raises(RlhfJaxError) as e:
        loader(BAD / name)
    message = str(e.value)
    where = f"{BAD / name}:{line}:" if line else f"{BAD / name}:"
    assert message.startswith(where), message
    assert text in message, message


def test_ties_are_accepted_when_allowed():
    examples, _ = load_rankings(BAD / "rank_ties.jsonl", allow_ties=True)
    assert examples[0].ranks == (0, 0, 1)


def test_skip_mode_keeps_good_rows_and_says_why(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        '{"prompt": "a"}\n'
        "not json\n"
        '{"prompt": "c", "completion": "d"}\n'
    )
    with pytest.raises(RlhfJaxError, match=r"mixed.jsonl:2: field 'completion': missing"):
        load_sft(f)
    examples, report = load_sft(f, on_error="skip")
    assert [e.prompt for e in examples] == ["a", "c"]
    assert [line for line, _ in report.skipped] == [2, 3]
    assert report.rows == 2 and "2 skipped" in report.summary()


def test_cli_exits_2_before_compiling_on_a_bad_data_file(tmp_path):
    bad = BAD / "sft_missing_field.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_jax.cli",
            "pipeline",
            "--output",
            str(tmp_path),
            f"sft.data={bad}",
            "log.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {bad}:2: field 'completion': missing"
    assert not (tmp_path / "sft").exists()  # failed before any training
