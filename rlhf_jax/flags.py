"""Numeric command-line flags, checked the way config keys are: each flag declares the range
of values it accepts (the config's `Range`, so NaN and infinity are never in it), and a value
outside it stops the command before anything loads with one line, `error: --temperature must
be >= 0, got nan`, and exit code 2 (the CLI catches RlhfJaxError around parsing).

Imports no JAX: the CLI builds its parser before any command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from rlhf_jax.config.schema import Range
from rlhf_jax.errors import RlhfJaxError

SEED = Range(0, 2**32 - 1)  # jax.random.key keeps 32 bits: larger seeds repeat smaller ones


class _InRange(argparse.Action):
    """Stores the converted value after checking it against `allowed`."""

    def __init__(self, *args: Any, allowed: Range, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if not self.allowed.contains(values):
            raise RlhfJaxError(f"{option_string} must be {self.allowed}, got {values!r}")
        setattr(namespace, self.dest, values)


def add_number(
    parser: argparse.ArgumentParser, flag: str, kind: type, allowed: Range, **kwargs: Any
) -> None:
    """`parser.add_argument(flag, type=kind, **kwargs)` whose value must lie in `allowed`.
    Every numeric flag of every command is declared through this."""
    parser.add_argument(flag, type=kind, action=_InRange, allowed=allowed, **kwargs)
