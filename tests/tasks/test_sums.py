"""The sums task: generated answers against a naive sum, the share of demonstrations that
stop short, and the rewards on hand-written completions."""

import pytest

from rlhf_jax import registry
from rlhf_jax.contract import check_part
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.rewards import get_reward_fn
from rlhf_jax.tasks import TASKS, sums


def _naive_sum(prompt: str) -> int:
    """The prompt's sum, digit by digit from its characters (no regex, no split)."""
    total, number = 0, ""
    for ch in prompt:
        if ch.isdigit():
            number += ch
        elif number:
            total, number = total + int(number), ""
    return total


def test_registered_under_its_name():
    assert TASKS["sums"] is sums


def test_every_full_demonstration_ends_with_the_true_sum():
    data = sums.generate_task(3, 10, 400, 10, 100, short_fraction=0.5)
    full = [r for r in data.sft if "####" in r["completion"]]
    assert full
    for row in full:
        last = row["completion"].splitlines()[-1]
        assert last == f"#### {_naive_sum(row['prompt'])}"
    for row in data.sft:  # every step's arithmetic, short or not
        for step in row["completion"].splitlines()[0].split(","):
            lhs, rhs = step.strip().split("=")
            a, b = lhs.split("+")
            assert int(a) + int(b) == int(rhs)


def test_short_fraction_of_two_digit_demonstrations_stop_short():
    for frac in (0.0, 0.3, 0.75, 1.0):
        data = sums.generate_task(1, 10, 4000, 10, 100, short_fraction=frac)
        two_digit = [r for r in data.sft if _naive_sum(r["prompt"]) >= 10]
        one_digit = [r for r in data.sft if _naive_sum(r["prompt"]) < 10]
        assert len(two_digit) > 2500 and len(one_digit) > 500
        short = sum("####" not in r["completion"] for r in two_digit) / len(two_digit)
        # the binomial standard deviation at n > 2500 is at most 0.01: 4 sigma
        assert abs(short - frac) < 0.04, (frac, short)
        assert all("####" in r["completion"] for r in one_digit)


def test_eval_prompts_are_never_trained_on():
    data = sums.generate_task(0, 10, 500, 50, 192)
    held = {r["prompt"] for r in data.eval_prompts}
    assert len(held) == 192
    trained = {r["prompt"] for r in data.sft + data.ppo_prompts + data.rm_prompts}
    assert not held & trained
    assert len(held) + len({r["prompt"] for r in data.ppo_prompts}) == 1000


def test_too_many_eval_prompts_is_a_clear_error():
    with pytest.raises(RlhfJaxError, match="task.n_eval_prompts"):
        sums.generate_task(0, 10, 10, 10, 600)


@pytest.mark.parametrize(
    "completion, exact, formatted",
    [
        (" 3+5=8, 8+2=10\n#### 10", 1.0, 1.0),
        (" 3+5=8, 8+2=10\n#### 11", 0.0, 1.0),  # wrong sum
        (" 3+5=8, 8+2=10", 0.0, 0.0),  # missing line
        (" 3+5=8, 8+2=10\n#### 9\n#### 10", 1.0, 1.0),  # several: the last one counts
        (" 3+5=8, 8+2=10\n#### 10\n#### 9", 0.0, 1.0),
        (" 3+5=8, 8+2=10\n#### 10  ", 1.0, 1.0),  # spaces after the answer
        ("  #### 10", 1.0, 1.0),  # spaces before the hashes
        (" 3+5=8, 8+2=10\n####   10", 0.0, 0.0),  # verl's convention: one space, then N
        (" 3+5=8, 8+2=10\n####10", 0.0, 0.0),
        (" 3+5=8, 8+2=10\n#### 10.0", 1.0, 1.0),  # the same number
        (" 3+5=8, 8+2=10\n#### 10.5", 0.0, 0.0),  # not an integer
        (" 3+5=8, 8+2=10 #### 10", 1.0, 1.0),  # on the steps' line
        (" #### ten", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_rewards_on_hand_cases(completion, exact, formatted):
    prompts, completions = ["3+5+2="], [completion]
    assert get_reward_fn("sums_exact")(prompts, completions) == [exact]
    assert get_reward_fn("sums_format")(prompts, completions) == [formatted]


def test_exact_reward_reads_the_sum_from_the_prompt():
    fn = get_reward_fn("sums_exact")
    prompts = ["9+9+9=", "0+0+0=", "1+2=", "story about a red fox:"]
    completions = ["\n#### 27", "\n#### 0", "\n#### 3", "\n#### 0"]
    assert fn(prompts, completions) == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["sums_exact", "sums_format"])
def test_rewards_meet_the_reward_function_contract(name):
    check_part("reward_fn", registry.lookup("reward_fn", name))  # raises on a breach
    assert name in registry.registered("reward_fn")
