"""`python -m rlhf_jax.tasks.gsm8k`: GSM8K's public rows (JSONL and parquet) to prompt rows
with `answer` and SFT rows, checked on hand-written rows; bad rows name file, line, field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.tasks import gsm8k

# Two rows in GSM8K's layout (the second with a thousands comma and a negative-free answer).
ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
        "as many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
        "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A farm has 1,200 hens and buys 30 more. How many hens does it have?",
        "answer": "1,200 + 30 = <<1200+30=1230>>1,230\n#### 1,230",
    },
]
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_rows_become_prompts_with_answers_and_sft_rows(tmp_path, capsys):
    src = _jsonl(tmp_path / "train.jsonl", ROWS)
    assert gsm8k.main([str(src), str(tmp_path / "out")]) == 0
    assert "2 rows" in capsys.readouterr().out
    prompts = _read(tmp_path / "out" / "prompts.jsonl")
    assert prompts == [
        {"prompt": ROWS[0]["question"] + " " + INSTRUCTION, "answer": "72"},
        {"prompt": ROWS[1]["question"] + " " + INSTRUCTION, "answer": "1230"},
    ]
    sft = _read(tmp_path / "out" / "sft.jsonl")
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in prompts]
    assert sft[1]["completion"] == "1,200 + 30 = 1,230\n#### 1,230"  # no calculator calls
    assert sft[0]["completion"].endswith("72 clips altogether in April and May.\n#### 72")
    assert "<<" not in sft[0]["completion"]


def test_parquet_gives_the_same_files(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
    _jsonl(tmp_path / "train.jsonl", ROWS)
    assert gsm8k.main([str(tmp_path / "train.parquet"), str(tmp_path / "a")]) == 0
    assert gsm8k.main([str(tmp_path / "train.jsonl"), str(tmp_path / "b")]) == 0
    for name in ("prompts.jsonl", "sft.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"question": "q"}, "train.jsonl:2: field 'answer': missing"),
        ({"question": "q", "answer": "no final line"}, "train.jsonl:2: field 'answer': no final"),
        ({"question": " ", "answer": "#### 3"}, "train.jsonl:2: field 'question': expected a"),
        ({"question": "q", "answer": "#### ."}, "train.jsonl:2: field 'answer': no final"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, capsys, bad, message):
    src = _jsonl(tmp_path / "train.jsonl", [ROWS[0], bad])
    assert gsm8k.main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_final_answer_is_the_last_hash_line_without_commas():
    assert gsm8k.final_answer("#### 5\nrestated\n#### -1,000.5") == "-1000.5"
    assert gsm8k.final_answer("the answer is 5") is None


def test_missing_file_and_usage(tmp_path, capsys):
    assert gsm8k.main([str(tmp_path / "none.jsonl"), str(tmp_path / "o")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert gsm8k.main(["only-one"]) == 2
    assert "usage" in capsys.readouterr().err
