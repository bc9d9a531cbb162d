"""Loaders on valid files: formats, ranking semantics, ties, skip reports, reading details."""

import json

import pytest

from rlhf_jax.data import (
    DataReport,
    PromptExample,
    RankingExample,
    RowError,
    SFTExample,
    TextExample,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
    parse_ranking_row,
    parse_sft_row,
    read_jsonl,
)
from rlhf_jax.errors import RlhfJaxError


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_each_format_loads(tmp_path):
    sft, report = load_sft(write(tmp_path, [{"prompt": "p", "completion": "c"}]))
    assert sft == [SFTExample("p", "c")] and report.rows == 1 and report.skipped == []
    assert (sft[0].path, sft[0].line) == (str(tmp_path / "data.jsonl"), 1)
    prompts, _ = load_prompts(write(tmp_path, ["", {"prompt": " q "}]))
    assert prompts == [PromptExample(" q ")] and prompts[0].line == 2  # kept exactly as given
    texts, _ = load_texts(write(tmp_path, [{"text": "t"}]))
    assert texts == [TextExample("t")]


def test_ranking_lists_indices_best_to_worst(tmp_path):
    row = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}
    (ex,), _ = load_rankings(write(tmp_path, [row]))
    # completion 2 is best (rank 0), completion 0 second, completion 1 worst
    assert ex.ranks == (1, 2, 0) and ex.ranking == (2, 0, 1)


def test_pairwise_is_the_k2_case(tmp_path):
    (ex,), _ = load_rankings(write(tmp_path, [{"prompt": "p", "chosen": "y", "rejected": "n"}]))
    assert ex == RankingExample("p", ("y", "n"), (0, 1))


def test_ties_only_with_allow_ties(tmp_path):
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranks": [0, 2, 2, 3]}
    with pytest.raises(RlhfJaxError, match="'ranks' .ties. needs allow_ties"):
        load_rankings(write(tmp_path, [row]))
    (ex,), _ = load_rankings(write(tmp_path, [row]), allow_ties=True)
    assert ex.ranks == (0, 1, 1, 2)  # dense: only the order matters
    assert ex.ranking == (0, 1, 2, 3)
    # the permutation form still works with allow_ties
    perm = {"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}
    assert parse_ranking_row(perm, allow_ties=True).ranks == (1, 0)


@pytest.mark.parametrize(
    "change, text",
    [
        ({"ranks": [0, 0, 0, 0]}, "all completions tie"),
        ({"ranks": [0, 1, 2]}, "expected 4 ranks"),
        ({"ranks": [0, 1, 2, 4]}, "ranks must lie in 0..3"),
        ({"ranks": [0, 1, 2, -1]}, "ranks must lie in 0..3"),
        ({"ranking": [0, 1, 2, 3]}, "give either 'ranking' or 'ranks', not both"),
    ],
)
def test_bad_ties(change, text):
    row = {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 2], **change}
    with pytest.raises(RowError, match=text) as e:
        parse_ranking_row(row, "f.jsonl", 4, allow_ties=True)
    assert str(e.value).startswith("f.jsonl:4: field 'ranks': ")


def test_max_k_is_adjustable():
    row = {"prompt": "p", "completions": list("abcd"), "ranking": [0, 1, 2, 3]}
    with pytest.raises(RowError, match=r"need 2..3 completions, got K = 4"):
        parse_ranking_row(row, max_k=3)


def test_chat_row_plain_rendering():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    ex = parse_sft_row(row)
    assert ex.prompt == "system: Be brief.\nuser: Hi\nassistant: " and ex.completion == "Hello"
    assert ex.messages == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"))


@pytest.mark.parametrize(
    "messages, field, text",
    [
        ("hi", "messages", "expected an array of messages, got string"),
        ([{"role": "assistant", "content": "x"}], "messages", "need at least 2 messages"),
        ([1, {"role": "assistant", "content": "x"}], "messages[0]", "expected an object"),
        (
            [{"role": "user"}, {"role": "assistant", "content": "x"}],
            "messages[0].content",
            "missing",
        ),
        (
            [
                {"role": "user", "content": "a", "name": "bob"},
                {"role": "assistant", "content": "x"},
            ],
            "messages[0].name",
            "unknown field",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}],
            "messages[1].content",
            "empty",
        ),
    ],
)
def test_bad_chat_rows(messages, field, text):
    with pytest.raises(RowError) as e:
        parse_sft_row({"messages": messages}, "c.jsonl", 9)
    assert e.value.field == field and text in e.value.problem
    assert str(e.value).startswith(f"c.jsonl:9: field '{field}': ")


def test_skip_mode_counts_and_reasons(tmp_path):
    path = write(
        tmp_path,
        [
            {"prompt": "a", "completion": "b"},
            {"prompt": "a"},
            "not json",
            "",
            {"prompt": "c", "completion": "d", "extra": 1},
            {"prompt": "e", "completion": "f"},
        ],
        "mixed.jsonl",
    )
    with pytest.raises(RlhfJaxError, match=r"mixed.jsonl:2: field 'completion': missing"):
        load_sft(path)
    examples, report = load_sft(path, on_error="skip")
    assert [e.prompt for e in examples] == ["a", "e"] and report.rows == 2
    assert [line for line, _ in report.skipped] == [2, 3, 5]
    assert report.skipped[0][1] == "field 'completion': missing"
    assert report.skipped[1][1].startswith("malformed JSON")
    assert report.skipped[2][1].startswith("field 'extra': unknown field")
    summary = report.summary()
    assert summary.startswith(f"{path}: 2 rows, 3 skipped (line 2: field 'completion': missing")
    assert summary.endswith(", 0 truncated") and "\n" not in summary


def test_summary_lists_a_few_reasons_then_a_count():
    report = DataReport("x.jsonl", rows=5, skipped=[(i, "bad") for i in range(1, 7)], truncated=2)
    assert report.summary() == (
        "x.jsonl: 5 rows, 6 skipped (line 1: bad; line 2: bad; line 3: bad; +3 more), 2 truncated"
    )


def test_on_error_must_be_known(tmp_path):
    with pytest.raises(RlhfJaxError, match="on_error must be 'raise' or 'skip'"):
        load_sft(write(tmp_path, [{"prompt": "a", "completion": "b"}]), on_error="ignore")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RlhfJaxError, match="nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(RlhfJaxError, match="is a directory"):
        load_prompts(tmp_path)


def test_bom_crlf_and_unicode_line_separators(tmp_path):
    path = tmp_path / "u.jsonl"
    # U+2028 inside a string must not split the line (str.splitlines would)
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "a"}\r\n'
        + '{"prompt": "x\u2028y"}\n'.encode()
        + b'{"prompt": 5}\n'
    )
    with pytest.raises(RlhfJaxError, match=r"u.jsonl:3: field 'prompt'"):
        load_prompts(path)
    lines = [(line, row["prompt"]) for line, row in read_jsonl(path)]
    assert lines == [(1, "a"), (2, "x\u2028y"), (3, 5)]


def test_read_jsonl_skip_list(tmp_path):
    path = write(tmp_path, ['{"a": 1}', "[1]", "{bad", '{"b": 2}'])
    skipped = []
    rows = list(read_jsonl(path, skipped))
    assert rows == [(1, {"a": 1}), (4, {"b": 2})]
    assert [line for line, _ in skipped] == [2, 3]


def test_deep_nesting_is_a_row_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(RlhfJaxError, match=r"deep.jsonl:1: "):
        load_prompts(path)


def test_chat_prompts_load_and_must_end_with_the_user(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    ]
    with pytest.raises(
        RlhfJaxError,
        match=r"data.jsonl:2: field 'messages\[1\].role': the last message must be the user's",
    ):
        load_prompts(write(tmp_path, rows))
    prompts, _ = load_prompts(write(tmp_path, rows[:1]))
    assert prompts[0].messages == (("system", "be kind"), ("user", "hi"))
    assert prompts[0].prompt == "system: be kind\nuser: hi\nassistant: "
    with pytest.raises(RlhfJaxError, match="field 'prompt': unknown field"):
        load_prompts(
            write(tmp_path, [{"messages": [{"role": "user", "content": "a"}], "prompt": "b"}])
        )


def test_prompt_rows_keep_extra_scalar_fields(tmp_path):
    rows = [
        {"prompt": "2+2?", "answer": "4", "id": 7},
        {"messages": [{"role": "user", "content": "3+3?"}], "answer": 6, "hard": False},
        {"prompt": "no extras"},
    ]
    prompts, _ = load_prompts(write(tmp_path, rows, "p.jsonl"))
    assert [p.fields for p in prompts] == [
        {"answer": "4", "id": 7},
        {"answer": 6, "hard": False},
        {},
    ]
    text = prompts[1].text()
    assert text == "user: 3+3?\nassistant: " and text.fields == {"answer": 6, "hard": False}
    assert text.where.endswith("p.jsonl:2")


@pytest.mark.parametrize(
    "row,message",
    [
        (
            {"prompt": "p", "answer": [1]},
            "field 'answer': an extra field of a prompt row is a JSON "
            "string, number or boolean (got array)",
        ),
        ({"prompt": "p", "answer": None}, "field 'answer': an extra field of a prompt row"),
        ({"prompt": "p", "meta": {"a": 1}}, "(got object)"),
        ({"prompt": "p", "completion": "c"}, "field 'completion': unknown field"),
        ({"prompt": "p", "role": "user"}, "field 'role': unknown field (a chat row has only"),
        ({"messages": [{"role": "user", "content": "a"}], "text": "t"}, "field 'text': unknown"),
    ],
)
def test_prompt_row_extra_fields_are_checked(tmp_path, row, message):
    with pytest.raises(RlhfJaxError) as e:
        load_prompts(write(tmp_path, [row], "p.jsonl"))
    assert "p.jsonl:1: field" in str(e.value) and message in str(e.value)


def test_prompt_text_pickles_with_its_fields():
    import pickle

    text = PromptExample("q", fields={"answer": "5"}, path="p.jsonl", line=3).text()
    back = pickle.loads(pickle.dumps(text))
    assert back == "q" and back.fields == {"answer": "5"} and back.where == "p.jsonl:3"
