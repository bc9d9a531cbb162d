"""The host scorer of the RL stage: what a reward function receives (the prompt as the data
file wrote it, once per sample of it; the decoded response) and how its failures read."""

from types import SimpleNamespace

import numpy as np
import pytest

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.host_scoring import host_scorer


class Letters:
    """A tokenizer stand-in: id i decodes to the i-th letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + int(i)) for i in ids)


def _rollout():
    ids = np.array([[0, 1, 2], [3, 4, 0], [5, 0, 0], [6, 7, 8]], np.int32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    return SimpleNamespace(response_ids=ids, response_mask=mask)


def test_a_reward_function_gets_the_files_prompt_per_sample_and_the_response():
    seen = {}

    def record(prompts, completions):
        seen["prompts"], seen["completions"] = list(prompts), list(completions)
        return [float(len(c)) for c in completions]

    algo = SimpleNamespace(reward_fn=record, reward_fn_name="record")
    score = host_scorer(algo, Letters(), samples_per_prompt=2)
    rows, scores = score(_rollout(), ["What is 2 + 2?", "user: hi\nassistant: "])
    assert rows == slice(0, 4)  # one process holds every row
    assert seen["prompts"] == ["What is 2 + 2?"] * 2 + ["user: hi\nassistant: "] * 2
    assert seen["completions"] == ["abc", "de", "f", ""]
    np.testing.assert_array_equal(scores, [3, 2, 1, 0])
    assert scores.dtype == np.float32


def test_a_reward_function_that_raises_is_one_line_naming_it_and_where():
    def crash(prompts, completions):
        return [1.0 / len(c) for c in completions]  # the empty response

    algo = SimpleNamespace(reward_fn=crash, reward_fn_name="my_pkg.rewards:crash")
    with pytest.raises(RlhfJaxError) as e:
        host_scorer(algo, Letters(), 1)(_rollout(), ["p", "q", "r", "s"])
    message = str(e.value)
    assert message.startswith(
        "reward function 'my_pkg.rewards:crash' raised ZeroDivisionError: float division by zero ("
        f"{__file__}:"
    )
    assert "completion 'abc'" in message and "\n" not in message
