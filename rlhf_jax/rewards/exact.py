"""Answer-checking rewards: the completion's final answer against the prompt row's `answer`
field (parsing and comparison: `rlhf_jax.answers`), and a format reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhf_jax.answers import boxed_answer, lenient_answer, same_answer, strict_answer
from rlhf_jax.config.schema import Range
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.rewards.core import register_reward_fn

_SCORES = {"correct": Range(), "wrong": Range()}  # any finite numbers
FORMATS = {"strict": strict_answer, "boxed": boxed_answer}


def reference_text(value: object) -> str:
    """A row's answer field as text: a JSON number 72 reads as "72" (then compared as a
    number by `same_answer`)."""
    return value if isinstance(value, str) else str(value)


def _score(
    extract: Callable[[str], str | None],
    completions: Sequence[str],
    answer: Sequence[object],
    correct: float,
    wrong: float,
) -> list[float]:
    return [
        correct if same_answer(extract(c), reference_text(a)) else wrong
        for c, a in zip(completions, answer)
    ]


@register_reward_fn("gsm8k_strict", ranges=_SCORES)
def gsm8k_strict(
    prompts: list[str],
    completions: list[str],
    *,
    answer: list,
    correct: float = 1.0,
    wrong: float = 0.0,
) -> list[float]:
    """`correct` when the completion's last `#### N` line (GSM8K's answer format, verl's
    convention) equals the row's `answer` as a number, else `wrong` (no such line included)."""
    return _score(strict_answer, completions, answer, correct, wrong)


@register_reward_fn("gsm8k_lenient", ranges=_SCORES)
def gsm8k_lenient(
    prompts: list[str],
    completions: list[str],
    *,
    answer: list,
    correct: float = 1.0,
    wrong: float = 0.0,
) -> list[float]:
    """`correct` when the last number in the completion equals the row's `answer`, whatever
    the format it is written in, else `wrong`."""
    return _score(lenient_answer, completions, answer, correct, wrong)


@register_reward_fn("boxed", ranges=_SCORES)
def boxed(
    prompts: list[str],
    completions: list[str],
    *,
    answer: list,
    correct: float = 1.0,
    wrong: float = 0.0,
) -> list[float]:
    """`correct` when the completion's last `\\boxed{...}` equals the row's `answer` (as a
    number when both parse, `\\frac{3}{4}` included; else as stripped text), else `wrong`."""
    return _score(boxed_answer, completions, answer, correct, wrong)


def _check_style(name: str, style: str = "strict", **_: object) -> None:
    if style not in FORMATS:
        raise RlhfJaxError(
            f"reward function {name!r}: hyperparameter 'style' must be one of "
            f"{', '.join(FORMATS)}, got {style!r}"
        )


@register_reward_fn(
    "answer_format",
    ranges={"present": Range(), "absent": Range()},
    check_hparams=_check_style,
)
def answer_format(
    prompts: list[str],
    completions: list[str],
    style: str = "strict",
    present: float = 1.0,
    absent: float = 0.0,
) -> list[float]:
    """`present` when the completion states an answer in the format `style` ("strict": a
    `#### N` line; "boxed": a closed, non-empty `\\boxed{...}`), right or wrong, else `absent`. No
    reference answer: a shaping term to add to a correctness reward (`weighted`)."""
    extract = FORMATS[style]
    return [present if extract(c) not in (None, "") else absent for c in completions]
