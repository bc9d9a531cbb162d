"""Each process encodes only the rows its own batches will use.

Batches (batching.py) visit epoch e's rows in the order `epoch_order(N, seed, e)`, the same on
every process and independent of the process count, so the global batch order is the one a
single process sees. A process feeds only its contiguous slice of each global batch
(`sharding.local_batch_rows`: the rows its devices hold). Which rows a process will ever read is
therefore known before any row is tokenized: `rows_used`, the union over the run's batches of
its slice of each. It tokenizes those and holds them as `HeldRows`; `batches` over a `HeldRows`
gives the same global batches with the rows of other processes left as zeros, which
`make_global_batch` never sends anywhere (each process passes on only its slice).

A run of at most one epoch reads 1/P of the rows on each of P processes; each further epoch
reshuffles, so a long multi-epoch run approaches every row on every process (the price of a
batch order identical to one process's). The file is still read and every row validated
(JSON and fields, cheap) on every process, so a bad row anywhere is reported as `file:line` by
every process and the row count, which fixes the shuffle, is known; only tokenizing and the
encoded rows are split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from rlhf_jax.errors import RlhfJaxError


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order epoch `epoch` visits `n` rows in (every process computes the same)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def _batches_of(n: int, batch_size: int, seed: int, n_batches: int, shuffle: bool):
    """Yield every batch's row indices, batch 0 first (`batches`' order, last partial
    batch of each epoch dropped)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise RlhfJaxError(f"only {n} rows of data for a batch size of {batch_size}")
    seed = int(seed) % 2**64  # as `batches` normalises it
    for epoch in range(-(-n_batches // per_epoch)):
        order = epoch_order(n, seed, epoch, shuffle)
        steps = min(per_epoch, n_batches - epoch * per_epoch)
        yield from order[: steps * batch_size].reshape(steps, batch_size)


def rows_used(
    n: int, batch_size: int, seed: int, n_batches: int, local: slice, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """`(rows, first)`: sorted indices of the rows of an `n`-row dataset that slice `local` of
    batches 0 .. n_batches - 1 (of `batch_size` rows, as `batches(..., seed)` makes them)
    reads, and for each whether this slice is the first to read it in the whole run (what
    lets P processes count something once per row: each counts the rows it reads first)."""
    used = np.zeros(n, bool)
    seen = np.zeros(n, bool)  # read by any slice of an earlier batch
    first = np.zeros(n, bool)
    for batch in _batches_of(n, batch_size, seed, n_batches, shuffle):
        mine = batch[local]
        first[mine[~seen[mine]]] = True
        used[mine] = True
        seen[batch] = True
    rows = np.flatnonzero(used)
    return rows, first[rows]


@dataclasses.dataclass(frozen=True)
class HeldRows:
    """Some rows of an `n`-row dataset: `arrays[k][j]` is row `rows[j]` (sorted), held by a
    process that reads slice `local` of each global batch of `batch_size` rows. `owner[j]`:
    whether this process is the one that evaluates row `rows[j]` when every row is evaluated
    (loops/owned_rows.py; each row has one owner). `repeat`: rows read in order, each standing
    `repeat` times in a row (e.g. K samples of one prompt; loops/process_rows.encode_ordered)."""

    arrays: dict[str, np.ndarray]
    rows: np.ndarray
    n: int
    batch_size: int
    local: slice
    owner: np.ndarray | None = None
    repeat: int = 1

    def with_arrays(self, **extra: np.ndarray) -> HeldRows:
        """The same rows with more arrays (one entry per held row)."""
        return dataclasses.replace(self, arrays={**self.arrays, **extra})

    def global_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` of the dataset (one global batch): the held ones filled in, the rest
        zeros; every row of this process's slice must be held."""
        pos = np.minimum(np.searchsorted(self.rows, indices), max(len(self.rows) - 1, 0))
        held = self.rows[pos] == indices if len(self.rows) else np.zeros(len(indices), bool)
        if not held[self.local].all():
            missing = indices[self.local][~held[self.local]]
            raise RlhfJaxError(
                f"rows {missing[:5].tolist()} of this process's batch slice were never encoded "
                "here (the batches read more steps than the rows were chosen for)"
            )
        out = {}
        for k, v in self.arrays.items():
            batch = np.zeros((len(indices), *v.shape[1:]), v.dtype)
            batch[held] = v[pos[held]]
            out[k] = batch
        return out


def select(examples: list, rows: np.ndarray) -> list:
    """The examples at `rows` (what a process tokenizes)."""
    return [examples[i] for i in rows]


def all_rows(arrays: Mapping[str, np.ndarray] | HeldRows) -> int:
    """The dataset's row count, whether every row or only some are held here."""
    if isinstance(arrays, HeldRows):
        return arrays.n
    return len(next(iter(arrays.values())))
