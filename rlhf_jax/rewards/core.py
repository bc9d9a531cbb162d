"""The reward-function machinery: registration, binding, the row fields a function needs, and
the checks on what it returns (`score_texts`)."""

from __future__ import annotations

import functools
import inspect
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax import registry
from rlhf_jax.errors import RlhfJaxError

RewardFn = Callable[..., Sequence[float]]


def register_reward_fn(name: str, **facts: Any) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a text reward function under `name` (`facts`: as
    `registry.register`'s, e.g. `ranges=`, `fields=`, `check_hparams=`)."""
    return registry.register("reward_fn", name, **facts)


def get_reward_fn(name: str, **hparams: Any) -> RewardFn:
    """The reward function registered as `name` (or "package.module:function"), bound."""
    return registry.resolve("reward_fn", name, **hparams)


def score_texts(
    fn: RewardFn,
    prompts: list[str],
    completions: list[str],
    name: str,
    fields: Mapping[str, Sequence] | None = None,
) -> np.ndarray:
    """`fn(prompts, completions, **fields)` as a float32 [B] array, checked: one finite number
    per completion (finite in float32, the dtype the scores train in), or a one-line
    RlhfJaxError naming the function and what it returned, or what it raised and where.

    `fields`: the row fields `fn` is given as keyword lists, one value per completion (TRL's
    convention), by default those it needs (`reward_fields`) read off the prompts
    (`PromptText.fields`, the prompt row's extra fields); a prompt without one is a one-line
    error naming its row."""
    if fields is None:
        fields = field_lists(fn, prompts, name)
    try:
        out = fn(prompts, completions, **fields)
    except RlhfJaxError:  # already one line naming what is wrong (a part of `weighted`)
        raise
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


def reward_fields(fn: RewardFn) -> tuple[str, ...]:
    """The prompt-row fields a (bound) reward function needs: the keyword parameters after
    `prompts, completions` that have no default and are not bound as hyperparameters
    (`fn(prompts, completions, *, answer, correct=1.0)` needs "answer"), or what the function
    declares with `fields=` (a callable of its hyperparameters, for a function whose needs
    depend on them, like `weighted`'s parts)."""
    bound, base = _bound(fn), fn
    while isinstance(base, functools.partial):
        base = base.func
    declared = registry.info(base).get("fields")
    if callable(declared):
        return tuple(declared(**bound))
    try:
        params = list(inspect.signature(base).parameters.values())[2:]
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(
        p.name
        for p in params
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in bound
    )


def field_lists(fn: RewardFn, prompts: Sequence[str], name: str) -> dict[str, list]:
    """The keyword lists `fn` is called with: each field it needs, one value per prompt (a
    prompt without it: a one-line error `path:LINE: field 'answer': missing (reward function
    'gsm8k_strict' needs it)`); to a function taking `**kwargs`, also every other field all the
    prompts have (TRL passes every dataset column)."""
    out: dict[str, list] = {}
    for field in reward_fields(fn):
        for p in prompts:
            if field not in getattr(p, "fields", {}):
                where = getattr(p, "where", "") or f"prompt {str(p)!r:.60}"
                raise RlhfJaxError(
                    f"{where}: field {field!r}: missing (reward function {name!r} needs it)"
                )
        out[field] = [p.fields[field] for p in prompts]
    if takes_any_keyword(fn) and prompts:
        common = set.intersection(*(set(getattr(p, "fields", {})) for p in prompts))
        taken = set(_bound(fn)) | set(out) | {"prompts", "completions"}
        out |= {f: [p.fields[f] for p in prompts] for f in sorted(common - taken)}
    return out


def _bound(fn: Callable) -> dict[str, object]:
    bound: dict[str, object] = {}
    while isinstance(fn, functools.partial):
        bound = {**fn.keywords, **bound}
        fn = fn.func
    return bound


def takes_any_keyword(fn: Callable) -> bool:
    """Whether `fn` takes `**kwargs` (then it is given every field the prompts share)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
