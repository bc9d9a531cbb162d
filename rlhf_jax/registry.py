"""Every swappable part, chosen by (kind, name) from config; a variant is a new registered
function, never a flag.

Kinds and their signatures:
  losses (`sft`, `reward`, `policy`, `value`, `ptx`, `preference`):
    `fn(outputs, batch, **hparams) -> LossOut`
  `advantage`: `fn(batch, **hparams) -> AdvantageOut` (see `rlhf_jax.advantages`)
  `reward_fn`: `fn(prompts: list[str], completions: list[str], **hparams) -> list[float]`,
      a scorer of decoded text run on the host (see `rlhf_jax.rewards`)
  `rollout_filter`: `fn(batch, **hparams) -> keep [B] bool`, which sampled groups the update
      trains on (see `rlhf_jax.filters`)

A name is a registered one or `"package.module:function"`, so a research fork selects its own
function from config without editing the library. `resolve` binds the hyperparameters with
`functools.partial` after checking their names against the signature.

A part may declare facts about itself with the `declare` decorator (or the keyword arguments of
`register`): `reads=(...)`, the batch keys it reads (checked by the contract checker and when a
config is loaded), for estimators `needs_critic` and `min_group_size`, and `ranges={"eps":
POSITIVE}`, the values each numeric hyperparameter accepts (`config.schema.Range`: never NaN
or infinity), checked by `resolve` when a config is loaded, and `check_hparams=fn(name,
**hparams)`, a part's own check of its hyperparameters' values (raising RlhfJaxError), also
run by `resolve`. `info(fn)` reads them back, also through `functools.partial`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from rlhf_jax.errors import RlhfJaxError

LOSS_KINDS = ("sft", "reward", "policy", "value", "ptx", "preference")
KINDS = (*LOSS_KINDS, "advantage", "reward_fn", "rollout_filter")

# How a kind is spoken of in messages ("unknown policy loss 'x'; available policy losses: ...").
_NOUNS = {kind: (f"{kind} loss", f"{kind} losses") for kind in LOSS_KINDS} | {
    "advantage": ("advantage estimator", "advantage estimators"),
    "reward_fn": ("reward function", "reward functions"),
    "rollout_filter": ("rollout filter", "rollout filters"),
}
# Leading positional parameters that are inputs, not hyperparameters.
_N_INPUTS = {kind: 2 for kind in LOSS_KINDS} | {"advantage": 1, "reward_fn": 2, "rollout_filter": 1}
# Modules whose import registers the built-in parts (imported lazily: no import cycles).
_BUILTIN_MODULES = (
    "rlhf_jax.losses",
    "rlhf_jax.advantages",
    "rlhf_jax.rewards",
    "rlhf_jax.filters",
    "rlhf_jax.tasks.sums",  # the sums task's reward functions
)

_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_ATTR = "__rlhf_jax_part__"  # where `declare` stores a function's facts


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise RlhfJaxError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def declare(**facts: Any) -> Callable[[Callable], Callable]:
    """Decorator recording facts about a part, e.g. `@declare(reads=("advantages",))` or
    `@declare(needs_critic=True)`; read back with `info`."""

    def decorator(fn: Callable) -> Callable:
        setattr(fn, _ATTR, {**getattr(fn, _ATTR, {}), **facts})
        return fn

    return decorator


def info(fn: Callable) -> dict[str, Any]:
    """The facts declared on `fn` (also when `fn` is a functools.partial of it)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return dict(getattr(fn, _ATTR, {}))


def register(kind: str, name: str, **facts: Any) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` available as `resolve(kind, name)`. Stack it for aliases."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")

    def decorator(fn: Callable) -> Callable:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"{kind} {name!r} is already registered ({existing.__name__})")
        if facts:
            declare(**facts)(fn)
        _REGISTRY[kind][name] = fn
        return fn

    return decorator


def registered(kind: str | None = None) -> dict[str, list[str]] | list[str]:
    """Sorted names of one kind, or `{kind: sorted names}` of all (aliases included)."""
    _load_builtins()
    if kind is not None:
        _check_kind(kind)
        return sorted(_REGISTRY[kind])
    return {k: sorted(names) for k, names in _REGISTRY.items()}


def lookup(kind: str, name: str) -> Callable:
    """The function registered as (kind, name) or imported from "package.module:function",
    without binding hyperparameters."""
    _load_builtins()
    _check_kind(kind)
    fn = _import(kind, name) if ":" in name else _REGISTRY[kind].get(name)
    if fn is None:
        noun, plural = _NOUNS[kind]
        raise RlhfJaxError(
            f"unknown {noun} {name!r}; available {plural}: {_available(kind)} "
            "(or 'package.module:function' for one outside the library)"
        )
    return fn


def resolve(kind: str, name: str = "default", **hparams: Any) -> Callable:
    """`lookup(kind, name)` with `hparams` bound (names checked against its signature)."""
    fn = lookup(kind, name)
    check_hparams(kind, name, fn, hparams)
    check_ranges(kind, name, fn, hparams)
    own_check = info(fn).get("check_hparams")
    if own_check is not None:  # the part's own checks of its values (`weighted`'s parts)
        own_check(name, **hparams)
    return functools.partial(fn, **hparams)


def accepts(fn: Callable, param: str) -> bool:
    """Whether `fn` takes keyword `param` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(param)
    return any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()) or (
        p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def _available(kind: str) -> str:
    return ", ".join(sorted(_REGISTRY[kind]))


def _import(kind: str, spec: str) -> Callable:
    noun, plural = _NOUNS[kind]
    available = f"available {plural}: {_available(kind)}"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RlhfJaxError(f"{noun} {spec!r}: expected 'package.module:function'; {available}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RlhfJaxError(
            f"{noun} {spec!r}: cannot import module {module_name!r} ({e}); {available}"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RlhfJaxError(
            f"{noun} {spec!r}: module {module_name!r} has no function {attr!r}; {available}"
        )
    return fn


def check_hparams(kind: str, name: str, fn: Callable, hparams: Mapping[str, Any]) -> None:
    """Fail at config time, not deep inside a jit trace, on a misspelled hyperparameter."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name
        for i, p in enumerate(params.values())
        if i >= _N_INPUTS[kind] and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise RlhfJaxError(
            f"{_NOUNS[kind][0]} {name!r} does not take {', '.join(unknown)}; "
            f"its hyperparameters: {', '.join(accepted) or '(none)'}"
        )


def check_ranges(kind: str, name: str, fn: Callable, hparams: Mapping[str, Any]) -> None:
    """A hyperparameter outside the range its part declares (`ranges=`) fails here, when the
    config is loaded, not as NaN updates later (GRPO's eps=0 divides 0 by 0)."""
    for key, allowed in info(fn).get("ranges", {}).items():
        value = hparams.get(key)
        if value is None:  # not given (the default), or None where the part allows it
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not allowed.contains(value):
            raise RlhfJaxError(
                f"{_NOUNS[kind][0]} {name!r}: hyperparameter {key!r} must be "
                f"{'' if number else 'a number '}{allowed}, got {value!r}"
            )


@functools.cache
def _load_builtins() -> None:
    # Importing these registers the built-in parts; done lazily so that importing this module
    # alone (e.g. to register a fork's part) does not create an import cycle.
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
