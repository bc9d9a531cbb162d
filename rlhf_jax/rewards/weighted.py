"""`weighted`: a sum of other reward functions, each with a weight (correctness plus a format
bonus, say). Its parts are resolved and checked when the config is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.rewards.core import (
    RewardFn,
    get_reward_fn,
    register_reward_fn,
    reward_fields,
    score_texts,
    takes_any_keyword,
)

_KEYS = ("name", "weight", "kwargs")


def resolve_part(owner: str, i: int, part: object) -> tuple[str, float, RewardFn]:
    """`parts[i]` of reward function `owner` -> (name, weight, bound function), or a one-line
    RlhfJaxError naming the part and what is wrong with it."""
    where = f"reward function {owner!r}, parts[{i}]"
    if not isinstance(part, Mapping):
        raise RlhfJaxError(f"{where}: expected a mapping {{name, weight, kwargs}}, got {part!r}")
    unknown = sorted(set(part) - set(_KEYS))
    if unknown:
        raise RlhfJaxError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(_KEYS)})")
    name = part.get("name")
    if not isinstance(name, str) or not name:
        raise RlhfJaxError(f"{where}: 'name' must be a reward function's name, got {name!r}")
    weight = part.get("weight", 1.0)
    finite = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not finite or not math.isfinite(weight):
        raise RlhfJaxError(f"{where} ({name!r}): 'weight' must be a finite number, got {weight!r}")
    kwargs = part.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RlhfJaxError(f"{where} ({name!r}): 'kwargs' must be a mapping, got {kwargs!r}")
    try:
        fn = get_reward_fn(name, **kwargs)
    except RlhfJaxError as e:
        raise RlhfJaxError(f"{where} ({name!r}): {e}") from None
    return name, float(weight), fn


def _check_parts(name: str, parts: object = None, **extra: Any) -> None:
    if extra:
        raise RlhfJaxError(
            f"reward function {name!r} does not take {', '.join(sorted(extra))}; its "
            "hyperparameters: parts"
        )
    if not isinstance(parts, list | tuple) or not parts:
        raise RlhfJaxError(
            f"reward function {name!r}: hyperparameter 'parts' must be a non-empty list of "
            f"{{name, weight, kwargs}}, got {parts!r}"
        )
    for i, part in enumerate(parts):
        resolve_part(name, i, part)


def _part_fields(parts: Sequence = (), **_: Any) -> list[str]:
    """The union of the fields the parts need, in order of first use."""
    fields: dict[str, None] = {}
    for i, part in enumerate(parts):
        fields |= dict.fromkeys(reward_fields(resolve_part("weighted", i, part)[2]))
    return list(fields)


@register_reward_fn("weighted", check_hparams=_check_parts, fields=_part_fields)
def weighted(
    prompts: list[str], completions: list[str], *, parts: Sequence, **fields: list
) -> np.ndarray:
    """`sum_i weight_i * part_i(prompts, completions)`, the parts given as
    `parts: [{name, weight (default 1), kwargs (default {})}]`; each part is given the row
    fields it needs, and is checked like any reward function."""
    total = np.zeros(len(completions), np.float64)
    for i, part in enumerate(parts):
        name, weight, fn = resolve_part("weighted", i, part)
        needs = reward_fields(fn)
        given = fields if takes_any_keyword(fn) else {f: fields[f] for f in needs}
        scores = score_texts(fn, prompts, completions, f"{name} (weighted parts[{i}])", given)
        total += weight * scores.astype(np.float64)
    return total
