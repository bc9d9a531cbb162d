"""Encoding: fixed shapes, masks from token counts, truncation counted, long prompts refused."""

import numpy as np
import pytest

from rlhf_jax.data import (
    DataReport,
    PromptExample,
    RankingExample,
    SFTExample,
    TextExample,
    batches,
    encode_prompts,
    encode_rankings,
    encode_sft,
    encode_texts,
)
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.tasks.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the red fox runs near the river. a calm owl sings."] * 30, 300)


def test_sft_masks_cover_exactly_completion_and_eos(tok):
    ex = SFTExample(prompt="the red fox", completion=" runs near the river.")
    out = encode_sft([ex], tok, max_len=24)
    ids, attn, loss = out["input_ids"][0], out["attention_mask"][0], out["loss_mask"][0]
    p = tok("the red fox", add_special_tokens=False)["input_ids"]
    c = tok(" runs near the river.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(p) + len(c)
    assert ids[:n].tolist() == p + c and (ids[n:] == tok.pad_token_id).all()
    assert attn.tolist() == [1.0] * n + [0.0] * (24 - n)
    assert loss.tolist() == [0.0] * len(p) + [1.0] * len(c) + [0.0] * (24 - n)
    assert tok.decode(ids[loss > 0], skip_special_tokens=True) == " runs near the river."


def test_long_completion_truncated_and_counted_long_prompt_refused(tok):
    report = DataReport("mem.jsonl", rows=2)
    long = SFTExample(prompt="the", completion=" fox" * 40)
    out = encode_sft([long], tok, max_len=10, report=report)
    assert out["attention_mask"].sum() == 10 and report.truncated == 1
    too_long = SFTExample(prompt="fox " * 20, completion=" a", path="d.jsonl", line=7)
    with pytest.raises(RlhfJaxError, match=r"d.jsonl:7: field 'prompt': \d+ tokens"):
        encode_sft([too_long], tok, max_len=10)
    skip = DataReport("d.jsonl", rows=1, on_error="skip")
    assert encode_sft([too_long], tok, max_len=10, report=skip)["input_ids"].shape == (0, 10)
    assert skip.skipped[0][0] == 7 and skip.rows == 0


def test_prompts_are_left_padded(tok):
    out = encode_prompts([PromptExample("the red fox"), PromptExample("a")], tok, 8)
    mask = out["attention_mask"]
    assert mask[0, -1] == 1 and mask[1, -1] == 1 and mask[1, 0] == 0
    n = int(mask[1].sum())
    assert tok.decode(out["input_ids"][1, -n:]) == "a"


def test_rankings_shape_ranks_and_eos_at_the_end(tok):
    examples = [
        RankingExample("the", (" fox", " owl", " red fox"), (2, 0, 1)),
        RankingExample("a", (" calm", " owl"), (1, 0)),
    ]
    out = encode_rankings(examples, tok, max_prompt_len=4, max_completion_len=6)
    assert out["input_ids"].shape == (2, 3, 11)
    assert out["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["rank"][0].tolist() == [2, 0, 1] and out["rank"][1, :2].tolist() == [1, 0]
    for i, j in [(0, 0), (0, 2), (1, 1)]:
        last = int(out["attention_mask"][i, j].sum()) - 1
        assert out["input_ids"][i, j, last] == tok.eos_token_id


def test_texts_and_batches(tok):
    arrays = encode_texts([TextExample("the red fox runs"), TextExample("owl")] * 5, tok, 6)
    assert arrays["input_ids"].shape == (10, 6)
    it = batches(arrays, 4, seed=0)
    first_epoch = [next(it)["input_ids"] for _ in range(2)]
    assert all(b.shape == (4, 6) for b in first_epoch)
    again = batches(arrays, 4, seed=0)
    np.testing.assert_array_equal(next(again)["input_ids"], first_epoch[0])
    with pytest.raises(RlhfJaxError, match="only 10 rows"):
        next(batches(arrays, 32, seed=0))
