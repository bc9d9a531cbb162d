"""Encoders: fixed shapes, masks from token counts, truncation counted, long prompts refused."""

import numpy as np
import pytest

from rlhf_jax.data import (
    DataReport,
    PromptExample,
    RankingExample,
    SFTExample,
    TextExample,
    encode_prompts,
    encode_rankings,
    encode_sft,
    encode_texts,
    special_ids,
)
from rlhf_jax.errors import RlhfJaxError


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sft_masks_cover_exactly_completion_and_eos(tok):
    ex = SFTExample(prompt="the red fox", completion=" runs near the river.")
    out = encode_sft([ex], tok, max_len=24)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "input_ids": ((1, 24), np.int32),
        "attention_mask": ((1, 24), np.float32),
        "loss_mask": ((1, 24), np.float32),
    }
    row, attn, loss = out["input_ids"][0], out["attention_mask"][0], out["loss_mask"][0]
    p, c = ids(tok, "the red fox"), ids(tok, " runs near the river.") + [tok.eos_token_id]
    n = len(p) + len(c)
    assert row[:n].tolist() == p + c and (row[n:] == tok.pad_token_id).all()
    assert attn.tolist() == [1.0] * n + [0.0] * (24 - n)
    assert loss.tolist() == [0.0] * len(p) + [1.0] * len(c) + [0.0] * (24 - n)
    assert tok.decode(row[loss > 0]) == " runs near the river.<eos>"
    assert tok.decode(row[attn > 0], skip_special_tokens=True) == "the red fox runs near the river."


def test_sft_truncation_is_counted_and_drops_the_eos(tok):
    p, c = ids(tok, "the"), ids(tok, " fox" * 40)
    report = DataReport("mem.jsonl", rows=1)
    out = encode_sft([SFTExample("the", " fox" * 40)], tok, max_len=10, report=report)
    assert report.truncated == 1 and out["attention_mask"].sum() == 10
    assert out["input_ids"][0].tolist() == p + c[: 10 - len(p)]  # no EOS
    assert out["loss_mask"][0].sum() == 10 - len(p)
    # a completion that fits exactly but leaves no room for the EOS counts as truncated
    exact = len(p) + len(ids(tok, " fox fox"))
    report = DataReport("mem.jsonl", rows=1)
    out = encode_sft([SFTExample("the", " fox fox")], tok, max_len=exact, report=report)
    assert report.truncated == 1 and tok.eos_token_id not in out["input_ids"][0].tolist()
    report = DataReport("mem.jsonl", rows=1)
    encode_sft([SFTExample("the", " fox fox")], tok, max_len=exact + 1, report=report)
    assert report.truncated == 0


def test_sft_long_prompt_is_an_error_or_skipped(tok):
    too_long = SFTExample(prompt="fox " * 20, completion=" a", path="d.jsonl", line=7)
    fine = SFTExample(prompt="the", completion=" owl", path="d.jsonl", line=8)
    with pytest.raises(RlhfJaxError, match=r"^d.jsonl:7: field 'prompt': prompt is \d+ tokens"):
        encode_sft([fine, too_long], tok, max_len=10)
    skip = DataReport("d.jsonl", rows=2, on_error="skip")
    out = encode_sft([fine, too_long], tok, max_len=10, report=skip)
    assert out["input_ids"].shape == (1, 10)
    assert skip.rows == 1 and skip.skipped[0][0] == 7 and "never truncated" in skip.skipped[0][1]
    with pytest.raises(RlhfJaxError, match="every row was skipped"):
        encode_sft([too_long], tok, max_len=10, report=DataReport("d.jsonl", 1, on_error="skip"))
    # a prompt of exactly max_len - 1 tokens still has room for one target
    p = ids(tok, "the red fox")
    out = encode_sft([SFTExample("the red fox", " runs")], tok, max_len=len(p) + 1)
    assert out["loss_mask"][0].tolist() == [0.0] * len(p) + [1.0]


def test_sft_chat_rows_use_the_template_when_there_is_one(tok, chat_tok):
    from rlhf_jax.data import parse_sft_row

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ok"}]}
    ex = parse_sft_row(row)
    out = encode_sft([ex], chat_tok, 32)
    real = out["input_ids"][0][out["attention_mask"][0] > 0]
    target = out["input_ids"][0][out["loss_mask"][0] > 0]
    assert chat_tok.decode(real) == "<|user|>hi\n<|assistant|> ok<eos>"
    assert chat_tok.decode(target) == " ok<eos>"
    plain = encode_sft([ex], tok, 32)  # no template: "role: content\n" + "assistant: "
    real = plain["input_ids"][0][plain["attention_mask"][0] > 0]
    assert tok.decode(real) == "user: hi\nassistant:  ok<eos>"


def test_chat_prompts_and_chat_template_for_plain_prompts(tok, chat_tok):
    """RL prompts in messages form go through the template with the generation prompt; with
    chat_template=True plain prompts (and SFT / ranking prompts) become one user message, so
    every stage sees the format a chat-SFT'd policy was tuned on."""
    from rlhf_jax.data import parse_prompt_row

    chat = parse_prompt_row({"messages": [{"role": "user", "content": "hi"}]})
    plain = PromptExample("hi")

    def text(out, row, t):
        return t.decode(out["input_ids"][row][out["attention_mask"][row] > 0])

    out = encode_prompts([chat, plain], chat_tok, 64)
    assert text(out, 0, chat_tok) == "<|user|>hi\n<|assistant|>"
    assert text(out, 1, chat_tok) == "hi"  # plain stays plain by default
    out = encode_prompts([chat, plain], chat_tok, 64, chat_template=True)
    assert text(out, 0, chat_tok) == text(out, 1, chat_tok) == "<|user|>hi\n<|assistant|>"
    assert text(encode_prompts([chat], tok, 64), 0, tok) == "user: hi\nassistant: "  # no template
    sft = encode_sft([SFTExample("hi", " ok")], chat_tok, 96, chat_template=True)
    real = sft["input_ids"][0][sft["attention_mask"][0] > 0]
    assert chat_tok.decode(real) == "<|user|>hi\n<|assistant|> ok<eos>"
    rank = encode_rankings(
        [RankingExample("hi", (" a", " b"), (0, 1))], chat_tok, 64, 4, chat_template=True
    )
    assert chat_tok.decode(rank["input_ids"][0, 0][rank["attention_mask"][0, 0] > 0]).startswith(
        "<|user|>hi\n<|assistant|> a"
    )
    with pytest.raises(
        RlhfJaxError, match="'data.chat_template' is true, but the tokenizer has no"
    ):
        encode_prompts([plain], tok, 64, chat_template=True)


def test_chat_template_failure_names_the_row(chat_tok):
    from rlhf_jax.data import parse_sft_row

    class Broken:
        def __getattr__(self, name):
            return getattr(chat_tok, name)

        def __call__(self, *a, **k):
            return chat_tok(*a, **k)

        def apply_chat_template(self, *a, **k):
            raise ValueError("Conversation roles must alternate user/assistant")

    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    ex = parse_sft_row(row, "chat.jsonl", 3)
    with pytest.raises(RlhfJaxError, match=r"^chat.jsonl:3: field 'messages': .*must alternate"):
        encode_sft([ex], Broken(), 16)


def test_sft_packing_keeps_segments_apart(tok):
    examples = [SFTExample("the", " fox"), SFTExample("a", " owl"), SFTExample("the red", " fox")]
    single = encode_sft(examples, tok, 12)
    packed = encode_sft(examples, tok, 12, pack=True)
    assert packed["input_ids"].shape[0] < 3 and "segment_ids" not in single
    seg = packed["segment_ids"]
    assert (seg[packed["attention_mask"] == 0] == 0).all()
    assert packed["loss_mask"].sum() == single["loss_mask"].sum()
    # each segment of a packed row is one example's tokens
    row0 = packed["input_ids"][0]
    first = single["input_ids"][0][single["attention_mask"][0] > 0]
    np.testing.assert_array_equal(row0[seg[0] == 1], first)


def test_prompts_are_left_padded(tok):
    out = encode_prompts([PromptExample("the red fox"), PromptExample("a")], tok, 8)
    assert out["input_ids"].shape == (2, 8) and out["input_ids"].dtype == np.int32
    mask = out["attention_mask"]
    for i, text in enumerate(["the red fox", "a"]):
        n = len(ids(tok, text))
        assert mask[i].tolist() == [0.0] * (8 - n) + [1.0] * n
        assert out["input_ids"][i, : 8 - n].tolist() == [tok.pad_token_id] * (8 - n)
        assert tok.decode(out["input_ids"][i, 8 - n :]) == text
    with pytest.raises(RlhfJaxError, match=r"^p.jsonl:2: field 'prompt': prompt is"):
        encode_prompts([PromptExample("fox " * 20, path="p.jsonl", line=2)], tok, 8)


def test_rankings_shape_ranks_and_eos_at_the_end(tok):
    examples = [
        RankingExample("the", (" fox", " owl", " red fox"), (2, 0, 1)),
        RankingExample("a", (" calm", " owl"), (1, 0)),
    ]
    out = encode_rankings(examples, tok, max_prompt_len=4, max_completion_len=6)
    assert out["input_ids"].shape == (2, 3, 11) and out["attention_mask"].shape == (2, 3, 11)
    assert out["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["rank"].dtype == np.int32 and out["rank"].tolist() == [[2, 0, 1], [1, 0, 3]]
    for i, ex in enumerate(examples):
        for j, completion in enumerate(ex.completions):
            mask = out["attention_mask"][i, j]
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # right-padded
            assert out["input_ids"][i, j, n - 1] == tok.eos_token_id  # reward read here
            assert tok.decode(out["input_ids"][i, j, : n - 1]) == ex.prompt + completion
    assert not out["attention_mask"][1, 2].any()  # padded slot: nothing real
    wide = encode_rankings(examples, tok, 4, 6, k_max=5)
    assert wide["input_ids"].shape == (2, 5, 11) and wide["completion_mask"][:, 3:].sum() == 0
    with pytest.raises(RlhfJaxError, match="field 'completions': K = 3 completions, more than"):
        encode_rankings(examples, tok, 4, 6, k_max=2)


def test_rankings_truncate_completions_and_refuse_long_prompts(tok):
    report = DataReport("r.jsonl", rows=1)
    ex = RankingExample("the", (" fox" * 10, " owl", " calm" * 10), (0, 1, 2))
    out = encode_rankings([ex], tok, 2, 3, report=report)
    assert report.truncated == 2
    n = out["attention_mask"][0].sum(-1)
    p = len(ids(tok, "the"))
    assert n.tolist() == [p + 3, p + len(ids(tok, " owl")) + 1, p + 3]
    assert out["input_ids"][0, 0, p + 2] != tok.eos_token_id  # truncated: no EOS
    long = RankingExample("fox " * 10, (" a", " b"), (0, 1), path="r.jsonl", line=5)
    with pytest.raises(RlhfJaxError, match=r"^r.jsonl:5: field 'prompt': prompt is"):
        encode_rankings([long], tok, 4, 3)


def test_completions_identical_after_truncation_are_left_out_and_counted(tok):
    """Two completions that differ only past max_completion_len become one input: ranking it
    both above and below the third would be a contradictory pair, so both are left out."""
    report = DataReport("r.jsonl", rows=1)
    ex = RankingExample("the", (" fox fox fox owl", " owl", " fox fox fox calm"), (0, 1, 2))
    out = encode_rankings([ex], tok, 2, 3, report=report)
    assert report.identical == 2 and report.truncated == 2
    assert out["completion_mask"][0].tolist() == [1, 0, 0]  # only " owl" remains
    assert out["rank"][0, 0] == 1  # its own rank (no pair left: the prompt adds no loss)
    assert "2 completions left out as identical" in report.summary()
    assert report.to_dict()["identical_after_truncation"] == 2


def test_texts_truncated_and_counted(tok):
    report = DataReport("t.jsonl", rows=2)
    out = encode_texts([TextExample("the red fox runs"), TextExample("owl")], tok, 4, report)
    assert out["input_ids"].shape == (2, 4) and report.truncated == 1
    assert out["attention_mask"].sum(-1).tolist() == [4, len(ids(tok, "owl")) + 1]
    n = len(ids(tok, "owl"))
    assert out["input_ids"][1, : n + 1].tolist() == ids(tok, "owl") + [tok.eos_token_id]


def test_start_tokens_come_from_the_tokenizer(bos_tok):
    """A tokenizer that adds `<bos> ... <eos>` keeps its BOS on prompts/texts, not the EOS."""
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    out = encode_prompts([PromptExample("the fox")], bos_tok, 6)
    n = int(out["attention_mask"][0].sum())
    assert out["input_ids"][0, -n:].tolist() == [bos] + ids(bos_tok, "the fox")
    sft = encode_sft([SFTExample("the", " fox")], bos_tok, 8)
    real = sft["input_ids"][0][sft["attention_mask"][0] > 0].tolist()
    assert real == [bos] + ids(bos_tok, "the") + ids(bos_tok, " fox") + [eos]
    text = encode_texts([TextExample("owl")], bos_tok, 8)
    assert text["input_ids"][0, : text["attention_mask"][0].sum().astype(int)].tolist() == (
        [bos] + ids(bos_tok, "owl") + [eos]
    )


def test_missing_pad_falls_back_to_eos_and_masks_still_come_from_lengths(nopad_tok):
    eos = nopad_tok.eos_token_id
    assert special_ids(nopad_tok) == (eos, eos)
    out = encode_sft([SFTExample("the", " fox")], nopad_tok, 10)
    n = len(ids(nopad_tok, "the")) + len(ids(nopad_tok, " fox")) + 1
    assert (out["input_ids"][0, n - 1 :] == eos).all()  # the real EOS, then EOS as padding
    assert out["attention_mask"][0].tolist() == [1.0] * n + [0.0] * (10 - n)
    assert out["loss_mask"][0, n - 1] == 1 and out["loss_mask"][0, n:].sum() == 0


def test_tokenizer_without_eos_is_an_error(tok):
    class NoEos:
        eos_token_id = None
        pad_token_id = 0

    with pytest.raises(RlhfJaxError, match="no EOS token"):
        encode_texts([TextExample("owl")], NoEos(), 4)


def test_empty_inputs_and_bad_lengths(tok):
    with pytest.raises(RlhfJaxError, match="no prompts to encode"):
        encode_prompts([], tok, 4)
    with pytest.raises(RlhfJaxError, match="max_len must be an integer >= 2"):
        encode_sft([SFTExample("a", "b")], tok, 1)


def test_rl_prompts_keep_each_rows_text_as_the_file_wrote_it(chat_tok):
    """What a reward function receives as the prompt: the file's text, row by row of the
    encoded arrays (skipped rows leave no gap), not the chat template decoded back."""
    from rlhf_jax.config import Config, load_config
    from rlhf_jax.data import parse_prompt_row
    from rlhf_jax.loops.encoding import RunEncoder

    examples = [
        PromptExample("What is 2 + 2?"),
        PromptExample("fox " * 80),  # longer than ppo.max_prompt_len: skipped
        parse_prompt_row(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                ]
            }
        ),
    ]
    report = DataReport("mem.jsonl", rows=3, on_error="skip")
    cfg = load_config(Config, None, ["data.chat_template=true", "ppo.max_prompt_len=50"])
    arrays, texts = RunEncoder(cfg, chat_tok).rl_prompts(examples, report)
    assert texts == ["What is 2 + 2?", "system: Be brief.\nuser: hi\nassistant: "]
    assert len(arrays["input_ids"]) == 2 and len(report.skipped) == 1
    decoded = chat_tok.decode(arrays["input_ids"][0][arrays["attention_mask"][0] > 0])
    assert decoded == "<|user|>What is 2 + 2?\n<|assistant|>"  # what the policy reads
