"""One way to run a compiled function over every row of a dataset, for evaluation and scoring."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


def map_batches(
    fn: Callable[..., Any],
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    with_offset: bool = False,
) -> Any:
    """`fn(batch)` over consecutive slices of `batch_size` rows of `arrays`, outputs (a pytree
    of arrays whose leading axis is the batch's rows) concatenated for all N rows.

    The last slice is padded to `batch_size` by repeating its last row, so one compiled shape
    serves every call, and the padded rows' outputs are cut off: every row is evaluated once
    and none is dropped. With `with_offset`, `fn(batch, start)` also gets the index of the
    slice's first row (e.g. to fold it into a sampling key).
    """
    n = len(next(iter(arrays.values())))
    outs = []
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v[start : start + batch_size]) for k, v in arrays.items()}
        short = batch_size - min(batch_size, n - start)
        if short:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for k, v in batch.items()}
        outs.append(jax.device_get(fn(batch, start) if with_offset else fn(batch)))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *outs)


def map_params(
    fn: Callable[[Any, dict], Any],
    params: Any,
    arrays: Mapping[str, np.ndarray],
    keys: tuple[str, ...],
    batch_size: int,
) -> Any:
    """`map_batches` of a compiled `fn(params, batch)` over the `keys` of `arrays` (only
    those travel to the device)."""
    return map_batches(lambda b: fn(params, b), {k: arrays[k] for k in keys}, batch_size)
