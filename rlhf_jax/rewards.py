"""Reward functions over decoded text: verifiable rewards, chosen by name (`ppo.reward_fn`).

Signature: `fn(prompts: list[str], completions: list[str], **hparams) -> Sequence[float]`, one
score per completion (the convention of TRL's `reward_funcs`). The prompt is the row's prompt
as the data file wrote it (a chat row's messages in their plain `role: content` rendering),
never the ids decoded back through a chat template; the completion is the decoded response up
to and including its EOS, special tokens dropped. It runs on the host between
sampling and the rest of the experience, so it may do anything Python can: parse a number and
compare it with a known answer, run unit tests, call a checker. When `ppo.reward_fn` is set it
replaces the reward model in RL (the pipeline still trains one, for its report).

A fork registers its own with `@register_reward_fn("name")`, or names a function
`package.module:function` in the config.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rlhf_jax import registry
from rlhf_jax.errors import RlhfJaxError

RewardFn = Callable[..., Sequence[float]]


def register_reward_fn(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a text reward function under `name`."""
    return registry.register("reward_fn", name)


def get_reward_fn(name: str, **hparams: Any) -> RewardFn:
    """The reward function registered as `name` (or "package.module:function"), bound."""
    return registry.resolve("reward_fn", name, **hparams)


def score_texts(fn: RewardFn, prompts: list[str], completions: list[str], name: str) -> np.ndarray:
    """`fn(prompts, completions)` as a float32 [B] array, checked: one finite number per
    completion (finite in float32, the dtype the scores train in), or a one-line RlhfJaxError
    naming the function and what it returned, or what it raised and where."""
    try:
        out = fn(prompts, completions)
    except Exception as e:  # the user's code: any error becomes one line naming it
        raise RlhfJaxError(
            f"reward function {name!r} raised {_described(e)} when called on "
            f"{len(completions)} completions (the first: prompt {prompts[0]!r:.80}, "
            f"completion {completions[0]!r:.80})"
        ) from e
    try:
        scores = np.asarray(out)
    except (TypeError, ValueError):
        scores = None
    if scores is None or scores.ndim != 1 or scores.dtype.kind not in "biuf":
        raise RlhfJaxError(
            f"reward function {name!r} must return one number per completion, got "
            f"{_one_line(repr(out))[:200]}"
        )
    if scores.shape[0] != len(completions):
        raise RlhfJaxError(
            f"reward function {name!r} returned {scores.shape[0]} scores for "
            f"{len(completions)} completions"
        )
    # Checked in float32, the dtype the scores are used in: 1e39 is finite in float64 but
    # becomes inf in float32 (and NaN advantages after it).
    with np.errstate(over="ignore"):
        used = scores.astype(np.float32)
    bad = [i for i, s in enumerate(used) if not math.isfinite(s)]
    if bad:
        i = bad[0]
        what = (
            f"a non-finite score ({scores[i]})"
            if not math.isfinite(scores[i])
            else f"a score ({scores[i]:g}) beyond float32's range (|score| < 3.4e38)"
        )
        raise RlhfJaxError(
            f"reward function {name!r} returned {what} for completion {i}: {completions[i]!r:.200}"
        )
    return used


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _described(e: BaseException) -> str:
    """`TypeName: message (file:line)`, the line where it was raised, on one line."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    message = _one_line(str(e))
    return f"{type(e).__name__}{': ' + message[:200] if message else ''}{where}"


@register_reward_fn("topics_gold")
def topics_gold(prompts: list[str], completions: list[str]) -> list[float]:
    """The built-in task's hidden gold reward (`tasks.topics.gold_reward`) used directly as a
    verifiable reward: the judgement the simulated labelers rank by, without their noise and
    without a reward model in between."""
    from rlhf_jax.tasks.topics import gold_reward

    return [gold_reward(p, c) for p, c in zip(prompts, completions)]
