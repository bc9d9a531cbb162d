"""Reward functions over text: the built-in gold reward, the answer checks (hand-decided
cases, adversarial ones included), `weighted`, row fields, and the checks on what one returns."""

import numpy as np
import pytest

from rlhf_jax import contract
from rlhf_jax.data.records import PromptText
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.rewards import field_lists, get_reward_fn, reward_fields, score_texts
from rlhf_jax.tasks.topics import gold_reward


def test_topics_gold_is_the_tasks_gold_reward():
    prompts = ["story about a red fox:", "write on a blue owl:"]
    completions = [" the happy red fox runs.", " the sad cat sleeps."]
    got = score_texts(get_reward_fn("topics_gold"), prompts, completions, "topics_gold")
    want = [gold_reward(p, c) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(got, want)
    assert got.dtype == np.float32


@pytest.mark.parametrize(
    "returned,message",
    [
        ([1.0], "returned 1 scores for 2 completions"),
        ([1.0, float("nan")], "returned a non-finite score (nan) for completion 1: 'b'"),
        # finite in float64, inf in float32 (the dtype the scores are used in)
        (
            [1e39, 0.0],
            "returned a score (1e+39) beyond float32's range (|score| < 3.4e38) for "
            "completion 0: 'a'",
        ),
        ([-4e38, 0.0], "returned a score (-4e+38) beyond float32's range"),
        (["x", "y"], "must return one number per completion"),
        (None, "must return one number per completion"),
        (["1.0", "2.0"], "must return one number per completion, got ['1.0', '2.0']"),
    ],
)
def test_what_a_reward_function_returns_is_checked(returned, message):
    with pytest.raises(RlhfJaxError, match=None) as e:
        score_texts(lambda p, c: returned, ["p", "q"], ["a", "b"], "mine")
    assert message in str(e.value) and "'mine'" in str(e.value)


def test_hyperparameters_are_bound_and_checked():
    with pytest.raises(RlhfJaxError, match="reward function 'topics_gold' does not take scale"):
        get_reward_fn("topics_gold", scale=2.0)


# --- answer-checking rewards -------------------------------------------------------------


def _rows(*answers):
    return [PromptText(f"q{i}", {"answer": a}, f"p.jsonl:{i + 1}") for i, a in enumerate(answers)]


def _score(name, completions, answers, **kwargs):
    return score_texts(get_reward_fn(name, **kwargs), _rows(*answers), completions, name).tolist()


# (completion, reference answer, strict, lenient, boxed), each decided by hand
CASES = [
    ("3 + 4 = 7\n#### 7", "7", 1, 1, 0),
    ("#### 1,234", "1234", 1, 1, 0),  # thousands comma
    ("#### 1234", "1,234", 1, 1, 0),  # a comma in the reference
    ("#### -5", "-5", 1, 1, 0),
    ("#### \u22125", "-5", 1, 1, 0),  # Unicode minus sign
    ("#### 2.50", "2.5", 1, 1, 0),  # decimals compared as numbers
    ("#### 5\nno wait\n#### 6", "5", 0, 0, 0),  # several ####: the last counts
    ("#### 5\nno wait\n#### 6", "6", 1, 1, 0),
    ("the answer is 7", "7", 0, 1, 0),  # no #### line
    ("#### ", "7", 0, 0, 0),  # #### with nothing after
    ("####\n7", "7", 0, 1, 0),
    ("so \\boxed{7}", "7", 0, 1, 1),
    ("\\boxed{\\frac{3}{4}}", "0.75", 0, 0, 1),  # lenient reads the 4
    ("", "7", 0, 0, 0),
    ("#### 7", 7, 1, 1, 0),  # a JSON number as the reference
    ("#### 7.0", "7", 1, 1, 0),
]


@pytest.mark.parametrize("completion,answer,strict,lenient,boxed", CASES)
def test_answer_rewards_on_hand_written_cases(completion, answer, strict, lenient, boxed):
    assert _score("gsm8k_strict", [completion], [answer]) == [strict]
    assert _score("gsm8k_lenient", [completion], [answer]) == [lenient]
    assert _score("boxed", [completion], [answer]) == [boxed]


def test_correct_and_wrong_scores_are_hyperparameters():
    got = _score("gsm8k_strict", ["#### 3", "#### 4"], ["3", "3"], correct=2.0, wrong=-1.0)
    assert got == [2.0, -1.0]
    with pytest.raises(RlhfJaxError, match="'correct' must be a finite number"):
        get_reward_fn("gsm8k_strict", correct=float("nan"))


def test_answer_format():
    texts = ["#### 12", "#### ", "12", "\\boxed{x}", "\\boxed{", "\\boxed{}"]
    assert _score("answer_format", texts, [""] * 6) == [1, 0, 0, 0, 0, 0]
    assert _score("answer_format", texts, [""] * 6, style="boxed") == [0, 0, 0, 1, 0, 0]
    with pytest.raises(RlhfJaxError, match="'style' must be one of strict, boxed, got 'xml'"):
        get_reward_fn("answer_format", style="xml")


def test_weighted_sums_its_parts():
    parts = [
        {"name": "gsm8k_strict", "weight": 1.0},
        {"name": "answer_format", "weight": 0.25, "kwargs": {"style": "boxed"}},
        {"name": "gsm8k_lenient", "weight": -0.5, "kwargs": {"correct": 2.0}},
    ]
    fn = get_reward_fn("weighted", parts=parts)
    assert reward_fields(fn) == ("answer",)
    texts = ["#### 3", "\\boxed{3}", "3 then #### 4"]
    got = score_texts(fn, _rows("3", "3", "3"), texts, "weighted").tolist()
    # by hand: strict + 0.25 * boxed-format - 0.5 * (2 if last number is 3 else 0)
    assert got == [1 + 0 - 1.0, 0 + 0.25 - 1.0, 0 + 0 - 0.0]


@pytest.mark.parametrize(
    "parts,message",
    [
        ([{"name": "gsm8k_strcit"}], "'weighted', parts[0] ('gsm8k_strcit'): unknown reward"),
        ([{"name": "boxed"}, {"name": "boxed", "kwargs": {"scale": 2}}], "parts[1] ('boxed'): "),
        ([{"name": "boxed", "weight": "high"}], "parts[0] ('boxed'): 'weight' must be a finite"),
        ([{"name": "boxed", "wieght": 1}], "parts[0]: unknown key 'wieght'"),
        ([{"weight": 1}], "parts[0]: 'name' must be a reward function's name, got None"),
        (["boxed"], "parts[0]: expected a mapping"),
        ([], "hyperparameter 'parts' must be a non-empty list"),
    ],
)
def test_weighted_parts_are_checked_when_resolved(parts, message):
    with pytest.raises(RlhfJaxError) as e:
        get_reward_fn("weighted", parts=parts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_field_names_the_row():
    rows = [PromptText("a", {"answer": "1"}, "p.jsonl:1"), PromptText("b", {}, "p.jsonl:3")]
    with pytest.raises(RlhfJaxError) as e:
        field_lists(get_reward_fn("gsm8k_strict"), rows, "gsm8k_strict")
    assert str(e.value) == (
        "p.jsonl:3: field 'answer': missing (reward function 'gsm8k_strict' needs it)"
    )


def test_fields_reach_a_function_taking_any_keyword():
    seen = {}

    def mine(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    rows = [PromptText("a", {"answer": "1", "id": 4}), PromptText("b", {"answer": "2"})]
    score_texts(mine, rows, ["x", "y"], "mine")
    assert seen == {"answer": ["1", "2"]}  # the fields every prompt of the batch has


def test_contract_checks_answer_rewards_on_sample_prompts():
    for name in ("gsm8k_strict", "gsm8k_lenient", "boxed", "answer_format"):
        contract.check_part("reward_fn", get_reward_fn(name))
    contract.check_part("reward_fn", get_reward_fn("weighted", parts=[{"name": "boxed"}]))
