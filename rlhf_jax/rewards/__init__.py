"""Reward functions over decoded text: verifiable rewards, chosen by name (`ppo.reward_fn`).

Signature: `fn(prompts: list[str], completions: list[str], **fields, **hparams) ->
Sequence[float]`, one score per completion (the convention of TRL's `reward_funcs`). The prompt
is the row's prompt as the data file wrote it (a chat row's messages in their plain
`role: content` rendering), never the ids decoded back through a chat template; the completion
is the decoded response up to and including its EOS, special tokens dropped. It runs on the
host between sampling and the rest of the experience, so it may do anything Python can: parse
a number and compare it with a known answer, run unit tests, call a checker. When
`ppo.reward_fn` is set it replaces the reward model in RL (the pipeline still trains one, for
its report, except on a verifiable-reward task such as `task.name: sums`, whose `sums_exact`
and `sums_format` are registered in `rlhf_jax/tasks/sums.py`).

Row fields: a prompt row may carry extra scalar fields (`{"prompt": "...", "answer": "72"}`); a
function names those it needs as keyword parameters without a default
(`fn(prompts, completions, *, answer, correct=1.0)`) and is given each as a list, one value per
completion (TRL's convention); a row without one is an error when the data is loaded
(`path:LINE: field 'answer': missing (reward function 'gsm8k_strict' needs it)`). A function
taking `**kwargs` is also given every field all the prompts of the batch share.

Built in: `topics_gold` (the built-in task), the answer checks `gsm8k_strict`, `gsm8k_lenient`
and `boxed` (need `answer`), `answer_format`, and `weighted` (a weighted sum of others).

A fork registers its own with `@register_reward_fn("name")`, or names a function
`package.module:function` in the config.
"""

from rlhf_jax.rewards.core import (
    RewardFn,
    field_lists,
    get_reward_fn,
    register_reward_fn,
    reward_fields,
    score_texts,
)
from rlhf_jax.rewards.exact import answer_format, boxed, gsm8k_lenient, gsm8k_strict
from rlhf_jax.rewards.topics import topics_gold
from rlhf_jax.rewards.weighted import weighted

__all__ = [
    "RewardFn",
    "answer_format",
    "boxed",
    "field_lists",
    "get_reward_fn",
    "gsm8k_lenient",
    "gsm8k_strict",
    "register_reward_fn",
    "reward_fields",
    "score_texts",
    "topics_gold",
    "weighted",
]
