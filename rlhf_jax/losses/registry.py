"""Losses chosen by (kind, name) from config, through the package-wide registry
(`rlhf_jax.registry`, which also holds advantage estimators and reward functions).

Every loss has the signature `fn(outputs, batch, **hparams) -> LossOut`: it receives model
outputs and the batch (both mappings of arrays), never the model, mesh or config. `get_loss`
binds the hyperparameters with `functools.partial`. A name of the form
`"package.module:function"` imports a user's loss from outside the library, so a research fork
can swap a loss from its config without editing this package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from rlhf_jax import registry
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.types import LossOut

LossFn = Callable[..., LossOut]
Arrays = Mapping[str, jax.Array]

KINDS = registry.LOSS_KINDS


def register_loss(kind: str, name: str, **facts: Any) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn` available as `get_loss(kind, name)`. Stack it for aliases.
    `facts` are declared on the function, e.g. `reads=("advantages", "response_mask")`."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; kinds: {', '.join(KINDS)}")
    return registry.register(kind, name, **facts)


def registered_losses() -> dict[str, list[str]]:
    """`{kind: sorted names}` of every built-in loss (aliases included)."""
    every = registry.registered()
    return {kind: every[kind] for kind in KINDS}


def get_loss(kind: str, name: str = "default", **hparams: Any) -> LossFn:
    """The loss `fn(outputs, batch) -> LossOut` registered as (kind, name), hparams bound.

    `name` is a registered name or `"package.module:function"` (the module must be importable,
    e.g. on PYTHONPATH). Raises RlhfJaxError naming the kind and the available names when the
    name is unknown or cannot be imported, or when a hyperparameter is not accepted.
    """
    if kind not in KINDS:
        raise RlhfJaxError(f"unknown loss kind {kind!r}; kinds: {', '.join(KINDS)}")
    return registry.resolve(kind, name, **hparams)
