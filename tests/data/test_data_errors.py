"""A corpus of malformed files (tests/data/bad/): each gives one error naming file, line, field.

File names start with the loader that reads them (sft_, rank_, prompts_, text_), or encode_
for rows that load but cannot be encoded (a prompt longer than its token budget).
"""

import sys
from pathlib import Path

import pytest
from processes import run

from rlhf_jax.data import (
    encode_prompts,
    encode_sft,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
)
from rlhf_jax.errors import RlhfJaxError

BAD = Path(__file__).parent / "bad"
LOADERS = {"sft": load_sft, "rank": load_rankings, "prompts": load_prompts, "text": load_texts}

# file -> (line or None for the whole file, text the message must contain)
EXPECTED = {
    "sft_bad_json.jsonl": (2, "malformed JSON: Expecting value (column"),
    "sft_wrong_type.jsonl": (1, "field 'prompt': expected a string, got number"),
    "sft_missing_field.jsonl": (2, "field 'completion': missing"),
    "sft_extra_field.jsonl": (1, "field 'score': unknown field (expected 'prompt', 'completion')"),
    "sft_empty_string.jsonl": (1, "field 'prompt': empty or whitespace-only string"),
    "sft_non_utf8.jsonl": (3, "not valid UTF-8 (byte 0xe9 at byte 16 of the line)"),
    "sft_not_object.jsonl": (1, "row is not a JSON object (got array)"),
    "sft_empty.jsonl": (None, "empty file"),
    "sft_blank_only.jsonl": (None, "empty file"),
    "sft_chat_last_not_assistant.jsonl": (
        1,
        "field 'messages[1].role': the last message must be the assistant's",
    ),
    "sft_chat_bad_role.jsonl": (1, "field 'messages[0].role': expected one of system, user"),
    "sft_chat_extra_field.jsonl": (1, "field 'prompt': unknown field (a chat row has only"),
    "rank_not_permutation.jsonl": (
        2,
        "field 'ranking': not a permutation of 0..3 (got [0, 0, 1, 2])",
    ),
    "rank_k_one.jsonl": (1, "field 'completions': need 2..9 completions, got K = 1"),
    "rank_k_ten.jsonl": (1, "field 'completions': need 2..9 completions, got K = 10"),
    "rank_duplicate.jsonl": (3, "field 'completions': completions 0 and 2 are identical"),
    "rank_ties.jsonl": (1, "field 'ranks': unknown field ('ranks' (ties) needs allow_ties"),
    "rank_ties_field.jsonl": (1, "field 'ties': unknown field (ties are given as 'ranks'"),
    "rank_wrong_type.jsonl": (1, "field 'ranking': expected an array of integers"),
    "rank_ranking_string.jsonl": (1, "field 'ranking': expected an array of integers"),
    "rank_bool.jsonl": (2, "field 'ranking': expected an array of integers (got [true, false])"),
    "rank_missing_ranking.jsonl": (2, "field 'ranking': missing"),
    "rank_no_format.jsonl": (1, "field 'completions': missing (a ranking row has"),
    "rank_pair_empty.jsonl": (1, "field 'rejected': empty or whitespace-only string"),
    "rank_pair_identical.jsonl": (1, "field 'rejected': identical to 'chosen'"),
    "prompts_extra_field.jsonl": (1, "field 'completion': unknown field (expected 'prompt')"),
    "prompts_lone_surrogate.jsonl": (
        2,
        "field 'prompt': an unpaired surrogate (\\ud800) is not text",
    ),
    "prompts_duplicate_key.jsonl": (1, "duplicate key 'prompt' in a JSON object"),
    "prompts_not_object.jsonl": (1, "row is not a JSON object (got array)"),
    "text_null.jsonl": (1, "field 'text': expected a string, got null"),
    "text_nan.jsonl": (1, "malformed JSON: NaN is not valid JSON"),
    "text_empty_string.jsonl": (2, "field 'text': empty or whitespace-only string"),
}

# Files that load but cannot be encoded: file -> (encode, line, text).
ENCODE_EXPECTED = {
    "encode_prompts_too_long.jsonl": (
        lambda tok: encode_prompts(load_prompts(BAD / "encode_prompts_too_long.jsonl")[0], tok, 16),
        2,
        "field 'prompt': prompt is",
    ),
    "encode_sft_prompt_too_long.jsonl": (
        lambda tok: encode_sft(load_sft(BAD / "encode_sft_prompt_too_long.jsonl")[0], tok, 32),
        3,
        "field 'prompt': prompt is",
    ),
}


def test_every_bad_file_is_covered():
    assert {p.name for p in BAD.glob("*.jsonl")} == set(EXPECTED) | set(ENCODE_EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_error_names_file_line_and_field(name):
    line, text = EXPECTED[name]
    loader = LOADERS[name.split("_")[0]]
    with pytest.raises(RlhfJaxError) as e:
        loader(BAD / name)
    message = str(e.value)
    where = f"{BAD / name}:{line}: " if line else f"{BAD / name}: "
    assert message.startswith(where), message
    assert text in message, message
    assert "\n" not in message


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_rows_are_skipped_with_their_line(name):
    line, text = EXPECTED[name]
    loader = LOADERS[name.split("_")[0]]
    try:
        _, report = loader(BAD / name, on_error="skip")
    except RlhfJaxError as e:  # every row bad, or no rows: still an error, naming the file
        assert str(e).startswith(f"{BAD / name}: "), str(e)
        if line is not None:
            assert f"line {line}: " in str(e) and text in str(e)
        return
    assert report.skipped == [(line, report.skipped[0][1])] and text in report.skipped[0][1]
    assert f"1 skipped (line {line}: " in report.summary()


@pytest.mark.parametrize("name", sorted(ENCODE_EXPECTED))
def test_prompt_too_long_names_its_line(name, tok):
    encode, line, text = ENCODE_EXPECTED[name]
    with pytest.raises(RlhfJaxError) as e:
        encode(tok)
    assert str(e.value).startswith(f"{BAD / name}:{line}: {text}"), str(e.value)
    assert "never truncated" in str(e.value)


def test_cli_exits_2_before_compiling_on_a_bad_data_file(tmp_path):
    bad = BAD / "sft_missing_field.jsonl"
    proc = run(
        [
            sys.executable,
            "-m",
            "rlhf_jax.cli",
            "pipeline",
            "--output",
            str(tmp_path),
            f"sft.data={bad}",
            "log.progress=false",
        ]
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: {bad}:2: field 'completion': missing"
    assert not (tmp_path / "sft").exists()  # failed before any training
