"""The built-in task's gold reward as a reward function."""

from __future__ import annotations

from rlhf_jax.rewards.core import register_reward_fn


@register_reward_fn("topics_gold")
def topics_gold(prompts: list[str], completions: list[str]) -> list[float]:
    """The built-in task's hidden gold reward (`tasks.topics.gold_reward`) used directly as a
    verifiable reward: the judgement the simulated labelers rank by, without their noise and
    without a reward model in between."""
    from rlhf_jax.tasks.topics import gold_reward

    return [gold_reward(p, c) for p, c in zip(prompts, completions)]
