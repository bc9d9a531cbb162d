"""Exact-answer accuracy (loops/answer_eval.py): pass@k against a naive enumeration of every
k-subset of the samples, the greedy interval against SciPy's Wilson interval, the rates on
hand-decided completions, and the sampler end to end on a tiny model."""

import itertools

import numpy as np
import pytest
from scipy import stats
from tiny import tiny_hf_checkpoint

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.answer_eval import evaluate_answers, ks_up_to, pass_at_k, score_answers


def naive_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(naive_pass_at_k(n, c, k), abs=1e-12)


def test_ks_are_powers_of_two_up_to_n():
    assert ks_up_to(1) == [1] and ks_up_to(4) == [1, 2, 4] and ks_up_to(7) == [1, 2, 4]


# 3 prompts x 4 samples, each decided by hand:
#   prompt 0 (answer 12): strict right twice, lenient right three times
#   prompt 1 (answer -3): strict right once, lenient right once
#   prompt 2 (answer 1000): none strict, lenient right once ("1,000" as the last number)
GROUPS = [
    ["#### 12", "so 12", "#### 12", "#### 13"],
    ["#### \u22123", "#### 3", "no idea", "#### 4\nwait #### 5"],
    ["total 1,000", "#### 999", "####", "#### 1000 apples then 7"],
]
REFERENCES = ["12", "-3", "1,000"]
STRICT = [[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
LENIENT = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]


def test_score_answers_on_hand_decided_completions():
    got = score_answers(GROUPS, REFERENCES, seed=3)
    assert got["n_prompts"] == 3 and got["samples"] == 4
    # strict answer lines: 3 + 3 (the last of "#### 4 ... #### 5") + 2 ("####" alone is none)
    assert got["format_rate"] == pytest.approx(8 / 12)
    for name, table in (("strict", STRICT), ("lenient", LENIENT)):
        block, counts = got[name], [sum(row) for row in table]
        assert block["pass@1"] == pytest.approx(np.mean(table))
        assert block["mean@n"] == pytest.approx(np.mean(table))
        for k in (1, 2, 4):
            want = np.mean([naive_pass_at_k(4, c, k) for c in counts])
            assert block["pass@k"][str(k)] == pytest.approx(want)
        assert sorted(block["pass@k"]) == ["1", "2", "4"]
        for key in ("pass@1_ci", "mean@n_ci"):  # bootstrap over the 3 prompts' c_i / 4
            lo, hi = block[key]
            assert min(counts) / 4 <= lo <= block["pass@1"] <= hi <= max(counts) / 4


@pytest.mark.parametrize("k_right", [0, 3, 7])
def test_greedy_pass_at_1_has_the_wilson_interval(k_right):
    groups = [["#### 1"] if i < k_right else ["#### 2"] for i in range(7)]
    block = score_answers(groups, ["1"] * 7)["strict"]
    assert block["pass@1"] == pytest.approx(k_right / 7)
    want = stats.binomtest(k_right, 7).proportion_ci(method="wilson")
    assert block["pass@1_ci"] == pytest.approx([want.low, want.high], abs=1e-6)
    assert block["pass@k"] == {"1": pytest.approx(k_right / 7)}


def test_score_answers_refuses_ragged_or_mismatched_input():
    with pytest.raises(ValueError, match="same number"):
        score_answers([["a"], ["b", "c"]], ["1", "2"])
    with pytest.raises(ValueError, match="one reference per prompt"):
        score_answers([["a"]], ["1", "2"])
    with pytest.raises(ValueError, match="at least one prompt"):
        score_answers([], [])


def test_evaluate_answers_samples_and_scores_on_a_tiny_model(tmp_path):
    from rlhf_jax.models import load_hf

    folder, tokenizer = tiny_hf_checkpoint(tmp_path / "model")
    cfg, params = load_hf(folder)
    prompts, refs = ["the red fox", "a calm owl", "the river"], ["1", "2", "3"]
    kw = dict(max_new_tokens=4, seed=0, batch_size=4)
    greedy = evaluate_answers(cfg, params, tokenizer, prompts, refs, samples=1, temperature=0, **kw)
    assert greedy["n_prompts"] == 3 and greedy["samples"] == 1
    assert [len(g) for g in greedy["completions"]] == [1, 1, 1]
    again = evaluate_answers(cfg, params, tokenizer, prompts, refs, samples=1, temperature=0, **kw)
    assert again["completions"] == greedy["completions"]  # greedy is deterministic
    sampled = evaluate_answers(
        cfg, params, tokenizer, prompts, refs, samples=4, temperature=1, **kw
    )
    assert [len(g) for g in sampled["completions"]] == [4, 4, 4]
    rescored = score_answers(sampled["completions"], refs, seed=0)
    assert {k: v for k, v in sampled.items() if k != "completions"} == rescored
    with pytest.raises(RlhfJaxError, match="4 samples per prompt need a temperature > 0"):
        evaluate_answers(cfg, params, tokenizer, prompts, refs, samples=4, temperature=0, **kw)
