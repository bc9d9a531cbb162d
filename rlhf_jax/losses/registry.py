"""Losses chosen by (kind, name) from config; a variant is a new registered function, not a flag.

Every loss has the signature `fn(outputs, batch, **hparams) -> LossOut`: it receives model
outputs and the batch (both mappings of arrays), never the model, mesh or config. `get_loss`
binds the hyperparameters with `functools.partial`. A name of the form
`"package.module:function"` imports a user's loss from outside the library, so a research fork
can swap a loss from its config without editing this package.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.types import LossOut

LossFn = Callable[..., LossOut]
Arrays = Mapping[str, jax.Array]

KINDS = ("sft", "reward", "policy", "value", "ptx")

_REGISTRY: dict[str, dict[str, LossFn]] = {kind: {} for kind in KINDS}


def register_loss(kind: str, name: str) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn` available as `get_loss(kind, name)`. Stack it for aliases."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown loss kind {kind!r}; kinds: {', '.join(KINDS)}")

    def decorator(fn: LossFn) -> LossFn:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"{kind} loss {name!r} is already registered ({existing.__name__})")
        _REGISTRY[kind][name] = fn
        return fn

    return decorator


def registered_losses() -> dict[str, list[str]]:
    """`{kind: sorted names}` of every built-in loss (aliases included)."""
    _load_builtins()
    return {kind: sorted(names) for kind, names in _REGISTRY.items()}


def get_loss(kind: str, name: str = "default", **hparams: Any) -> LossFn:
    """The loss `fn(outputs, batch) -> LossOut` registered as (kind, name), hparams bound.

    `name` is a registered name or `"package.module:function"` (the module must be importable,
    e.g. on PYTHONPATH). Raises RlhfJaxError naming the kind and the available names when the
    name is unknown or cannot be imported, or when a hyperparameter is not accepted.
    """
    _load_builtins()
    if kind not in _REGISTRY:
        raise RlhfJaxError(f"unknown loss kind {kind!r}; kinds: {', '.join(KINDS)}")
    fn = _import_loss(kind, name) if ":" in name else _REGISTRY[kind].get(name)
    if fn is None:
        raise RlhfJaxError(
            f"unknown {kind} loss {name!r}; available {kind} losses: {_available(kind)} "
            "(or 'package.module:function' for a loss outside the library)"
        )
    _check_hparams(kind, name, fn, hparams)
    return functools.partial(fn, **hparams)


def _available(kind: str) -> str:
    return ", ".join(sorted(_REGISTRY[kind]))


def _import_loss(kind: str, spec: str) -> LossFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RlhfJaxError(
            f"{kind} loss {spec!r}: expected 'package.module:function'; "
            f"available {kind} losses: {_available(kind)}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RlhfJaxError(
            f"{kind} loss {spec!r}: cannot import module {module_name!r} ({e}); "
            f"available {kind} losses: {_available(kind)}"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RlhfJaxError(
            f"{kind} loss {spec!r}: module {module_name!r} has no function {attr!r}; "
            f"available {kind} losses: {_available(kind)}"
        )
    return fn


def _check_hparams(kind: str, name: str, fn: LossFn, hparams: Mapping[str, Any]) -> None:
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
        if i >= 2 and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise RlhfJaxError(
            f"{kind} loss {name!r} does not take {', '.join(unknown)}; "
            f"its hyperparameters: {', '.join(accepted) or '(none)'}"
        )


@functools.cache
def _load_builtins() -> None:
    # Importing the package registers the built-in losses; done lazily so that importing this
    # module alone (e.g. to register a fork's loss) does not create an import cycle.
    importlib.import_module("rlhf_jax.losses")
