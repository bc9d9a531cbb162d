"""Properties: whatever a file or row holds, only the project's own error comes out; encoded
masks always agree with the token counts."""

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.data import (
    RowError,
    SFTExample,
    encode_sft,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
    parse_prompt_row,
    parse_ranking_row,
    parse_sft_row,
    parse_text_row,
)
from rlhf_jax.errors import RlhfJaxError

KEYS = ["prompt", "completion", "completions", "ranking", "ranks", "chosen", "rejected"]
KEYS += ["text", "messages", "role", "content", "ties", "extra"]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars | st.sampled_from(["user", "assistant", "system", "a", " "]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=12,
)
rows = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
PARSERS = [
    parse_sft_row,
    parse_prompt_row,
    parse_text_row,
    parse_ranking_row,
    lambda row, path, line: parse_ranking_row(row, path, line, allow_ties=True),
]
LOADERS = (load_sft, load_rankings, load_prompts, load_texts)


@settings(max_examples=300, deadline=None)
@given(rows)
def test_parsers_raise_only_row_errors(row):
    for parse in PARSERS:
        try:
            parse(row, "f.jsonl", 3)
        except RowError as e:
            assert str(e).startswith("f.jsonl:3: ") and "\n" not in e.reason


def _load_all(path: Path):
    for loader in LOADERS:
        for mode in ("raise", "skip"):
            with contextlib.suppress(RlhfJaxError):
                loader(path, on_error=mode)


@settings(max_examples=60, deadline=None)
@given(st.lists(rows, max_size=4))
def test_loaders_on_arbitrary_rows(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in data))
        _load_all(path)


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=200)
    | st.lists(st.sampled_from([b"{", b"}", b"\n", b'"', b"\xff"])).map(b"".join)
)
def test_loaders_on_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bytes.jsonl"
        path.write_bytes(data)
        _load_all(path)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 9).flatmap(lambda k: st.permutations(list(range(k)))))
def test_ranking_round_trips(ranking):
    completions = [f"c{i}" for i in range(len(ranking))]
    ex = parse_ranking_row({"prompt": "p", "completions": completions, "ranking": ranking})
    assert list(ex.ranking) == ranking
    assert [ex.ranks[i] for i in ranking] == list(range(len(ranking)))


nonblank = st.text(min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(nonblank, nonblank, st.integers(2, 40))
def test_sft_masks_agree_with_token_counts(tok, prompt, completion, max_len):
    ex = SFTExample(prompt, completion, path="p.jsonl", line=1)
    try:
        out = encode_sft([ex], tok, max_len)
    except RlhfJaxError as e:  # only ever a prompt with no room left
        assert str(e).startswith("p.jsonl:1: field 'prompt': prompt is")
        return
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    attn, loss = out["attention_mask"][0], out["loss_mask"][0]
    n = int(attn.sum())
    assert n == min(len(p) + len(c), max_len)
    assert attn[:n].all() and not attn[n:].any()
    assert not loss[: len(p)].any() and loss[len(p) : n].all() and not loss[n:].any()
    assert np.array_equal(out["input_ids"][0, :n], np.array((p + c)[:n]))
    if n == len(p) + len(c):
        assert tok.decode(out["input_ids"][0][loss > 0]) == completion + tok.eos_token
