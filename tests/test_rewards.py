"""Reward functions over text: the built-in gold reward and the checks on what one returns."""

import numpy as np
import pytest

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.rewards import get_reward_fn, score_texts
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
