"""The built-in "sums" task: add three digits, showing the steps, ending with `#### <sum>`.

A verifiable-reward (RLVR) task small enough for a laptop CPU:
- prompts like "3+5+2=" whose answer is computed from the prompt itself;
- demonstrations that show the partial sums (" 3+5=8, 8+2=10") and end with the line
  "#### 10", except that on prompts whose sum has two digits (about 78% of them) a fraction
  `task.short_fraction` of the demonstrations stop short: the labeler wrote the steps but
  dropped the final answer line. SFT learns to answer one-digit sums and, greedily, to stop
  before the answer of the others, so its exact accuracy starts near 22%;
- an exact reward (`sums_exact`: 1.0 when the `####` answer is the true sum), so RL (GRPO)
  can find what SFT did not teach: finish every answer with its line.
A uniform stop-short rate would not do: a greedy policy then either always or never writes
the answer line, so SFT would start at 0% or at its arithmetic's accuracy.
Held-out evaluation prompts are triples never seen in any training stage.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

import numpy as np

from rlhf_jax.answers import normalise_number, same_answer, strict_answer
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.rewards import register_reward_fn

N_ADDENDS = 3
DIGITS = range(10)
_PROMPT_RE = re.compile(r"^\s*(\d+(?:\+\d+)+)=\s*$")


def parse_prompt(prompt: str) -> list[int] | None:
    """The addends of a task prompt ("3+5+2=" -> [3, 5, 2]), or None for another prompt."""
    m = _PROMPT_RE.match(prompt)
    return [int(x) for x in m.group(1).split("+")] if m else None


def final_answer(completion: str) -> int | None:
    """The completion's answer as an integer: what its last `#### N` reads
    (`answers.strict_answer`, verl's GSM8K convention), or None when there is none or it is
    not a whole number."""
    value = normalise_number(strict_answer(completion))
    return int(value) if value is not None and value.denominator == 1 else None


def reference_answer(prompt: str) -> str:
    """The right answer to a task prompt, as text ("3+5+2=" -> "10")."""
    addends = parse_prompt(prompt)
    if addends is None:
        raise ValueError(f"not a sums prompt: {prompt!r}")
    return str(sum(addends))


def exact_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion's `#### N` answer equals the sum of the prompt's addends."""
    addends = parse_prompt(prompt)
    if addends is None:
        return 0.0
    return float(same_answer(strict_answer(completion), str(sum(addends))))


def format_reward(completion: str) -> float:
    """1.0 when the completion has a `#### <integer>` answer, right or wrong."""
    return float(final_answer(completion) is not None)


gold_reward = exact_reward  # the name every built-in task exposes (tasks/__init__.py)


def steps(addends: list[int]) -> str:
    """The worked steps: [3, 5, 2] -> "3+5=8, 8+2=10"."""
    total, parts = addends[0], []
    for a in addends[1:]:
        parts.append(f"{total}+{a}={total + a}")
        total += a
    return ", ".join(parts)


def demonstration(addends: list[int], short: bool) -> str:
    """A labeler's answer: the steps and the `#### <sum>` line, or (short) the steps only."""
    text = " " + steps(addends)
    return text if short else f"{text}\n#### {sum(addends)}"


def make_prompt(addends: list[int]) -> str:
    return "+".join(str(a) for a in addends) + "="


def pretrain_text(rng: np.random.Generator) -> str:
    """Generic arithmetic text of the task's world (no prompt): a chain of 1 to 3 additions
    of digits, sometimes with its answer line, so the base model knows sums and the format."""
    addends = [int(a) for a in rng.integers(0, 10, size=int(rng.integers(2, 5)))]
    text = steps(addends)
    return f"{text}\n#### {sum(addends)}" if rng.random() < 0.3 else text


def triples(seed: int, n_eval: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train, eval) split of all digit triples; eval triples are never trained on."""
    every = [list(t) for t in itertools.product(DIGITS, repeat=N_ADDENDS)]
    if not 0 < n_eval <= len(every) // 2:
        raise RlhfJaxError(
            f"task.n_eval_prompts: the sums task holds out at most {len(every) // 2} of its "
            f"{len(every)} prompts, got {n_eval}"
        )
    order = np.random.default_rng(seed).permutation(len(every))
    every = [every[i] for i in order]
    return every[n_eval:], every[:n_eval]


@dataclasses.dataclass
class SumsData:
    """All generated rows of the task, as the JSONL records the data loaders read (the same
    fields as the topics task's data)."""

    pretrain: list[dict]  # {"text"}: pretraining (and ptx)
    pretrain_heldout: list[dict]  # {"text"}
    sft: list[dict]  # {"prompt", "completion"}
    rm_prompts: list[dict]  # {"prompt"}: only `rlhf-jax compare` samples and ranks them
    ppo_prompts: list[dict]  # {"prompt"}
    eval_prompts: list[dict]  # {"prompt"} on held-out triples


def generate_task(
    seed: int,
    n_pretrain: int,
    n_demos: int,
    n_rm_prompts: int,
    n_eval: int,
    short_fraction: float = 0.75,
) -> SumsData:
    rng = np.random.default_rng(seed)
    train, held = triples(seed, n_eval)

    def pick() -> list[int]:
        return train[int(rng.integers(len(train)))]

    sft = []
    for _ in range(n_demos):
        addends = pick()
        short = sum(addends) >= 10 and bool(rng.random() < short_fraction)
        sft.append({"prompt": make_prompt(addends), "completion": demonstration(addends, short)})
    n_heldout = max(64, n_pretrain // 10)
    return SumsData(
        pretrain=[{"text": pretrain_text(rng)} for _ in range(n_pretrain)],
        pretrain_heldout=[{"text": pretrain_text(rng)} for _ in range(n_heldout)],
        sft=sft,
        rm_prompts=[{"prompt": make_prompt(pick())} for _ in range(n_rm_prompts)],
        ppo_prompts=[{"prompt": make_prompt(t)} for t in train],
        eval_prompts=[{"prompt": make_prompt(t)} for t in held],
    )


def task_options(task_cfg: Any) -> dict[str, Any]:
    """The `task.*` settings of this task beyond the sizes every task takes."""
    return {"short_fraction": task_cfg.short_fraction}


def rank_by_labelers(
    rng: np.random.Generator, prompt: str, completions: list[str], noise: float
) -> list[int]:
    """Simulated labelers (for `rlhf-jax compare`): indices best first by exact reward, the
    format as a half-point tie-breaker, plus Gaussian noise."""
    noisy = [
        exact_reward(prompt, c) + 0.5 * format_reward(c) + noise * rng.standard_normal()
        for c in completions
    ]
    return [int(i) for i in np.argsort(noisy)[::-1]]


@register_reward_fn("sums_exact")
def sums_exact(prompts: list[str], completions: list[str]) -> list[float]:
    """The sums task's verifiable reward: 1.0 when the last `#### N` holds the prompt's sum
    (computed from the prompt, no data field), else 0.0."""
    return [exact_reward(p, c) for p, c in zip(prompts, completions)]


@register_reward_fn("sums_format")
def sums_format(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the completion gives a `#### <integer>` answer, right or wrong."""
    return [format_reward(c) for c in completions]
