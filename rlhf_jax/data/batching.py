"""Deterministic, resumable batches over the rows of a dict of equal-length arrays.

Epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation(N)`: a
fresh shuffle every epoch, and any position can be reached directly, with no replay. A run
resumes where it stopped by saving `iterator.consumed` (batches taken so far, i.e. the step) or
`iterator.position` (epoch, index) in its checkpoint and passing it back as `start`.

Multi-process runs: every process builds the same iterator (same arrays, seed and global
`batch_size`) with its own `process_index`, and receives its contiguous slice of each global
batch (rows `[p * B/P, (p + 1) * B/P)`), so the P slices of one step, concatenated in process
order, are exactly the batch a single process would see. Alternatively a process passes only
the rows it will read (`shard.HeldRows`): it then gets the same global batches with the rows
of the other processes' slices left as zeros.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from rlhf_jax.data.shard import HeldRows, epoch_order
from rlhf_jax.errors import RlhfJaxError


class Batches(Iterator[dict[str, np.ndarray]]):
    """Iterator of batches (dicts of row-indexed copies); see `batches` for the arguments."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray] | HeldRows,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        *,
        shuffle: bool = True,
        start: int | tuple[int, int] = 0,
        epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.held = arrays if isinstance(arrays, HeldRows) else None
        if self.held is not None:
            if batch_size != self.held.batch_size or process_count > 1 or not drop_last:
                raise RlhfJaxError(
                    f"batches: rows held for full batches of {self.held.batch_size} cannot "
                    f"make batches of {batch_size} (nor a last partial one, nor a slice)"
                )
            arrays = self.held.arrays
        if not arrays:
            raise RlhfJaxError("batches: no arrays given")
        sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if n is None or any(s != n for s in sizes.values()):
            raise RlhfJaxError(f"batches: arrays must share their leading dimension, got {sizes}")
        if self.held is not None:
            if n != len(self.held.rows):
                raise RlhfJaxError(f"batches: {n} rows of arrays for {len(self.held.rows)} held")
            n = self.held.n
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RlhfJaxError(f"batch size must be a positive integer, got {batch_size!r}")
        if not 0 <= process_index < process_count:
            raise RlhfJaxError(f"process index {process_index} is not in 0..{process_count - 1}")
        if batch_size % process_count:
            raise RlhfJaxError(
                f"batch size {batch_size} does not divide across {process_count} processes"
            )
        if process_count > 1 and not drop_last:
            raise RlhfJaxError("batches split across processes need drop_last=True")
        self.arrays = dict(arrays)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.epochs = shuffle, epochs
        self.per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.per_epoch == 0:
            raise RlhfJaxError(f"only {n} rows of data for a batch size of {batch_size}")
        local = batch_size // process_count
        self._slice = slice(process_index * local, (process_index + 1) * local)
        if isinstance(start, tuple):
            epoch, index = start
            if epoch < 0 or not 0 <= index <= self.per_epoch:
                raise RlhfJaxError(
                    f"batches: start {start} is outside 0 <= index <= {self.per_epoch} per epoch"
                )
            start = epoch * self.per_epoch + index
        if start < 0:
            raise RlhfJaxError(f"batches: start must be >= 0, got {start}")
        self.consumed = int(start)
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def position(self) -> tuple[int, int]:
        """`(epoch, index within the epoch)` of the next batch."""
        return divmod(self.consumed, self.per_epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`."""
        return epoch_order(self.n, self.seed, epoch, self.shuffle)

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, index = self.position
        if self.epochs is not None and epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.order(epoch), epoch
        lo = index * self.batch_size
        rows = self._order[lo : lo + self.batch_size][self._slice]
        self.consumed += 1
        if self.held is not None:
            return self.held.global_batch(rows)
        return {k: v[rows] for k, v in self.arrays.items()}


def batches(
    arrays: Mapping[str, np.ndarray] | HeldRows,
    batch_size: int,
    seed: int | np.random.Generator = 0,
    drop_last: bool = True,
    *,
    shuffle: bool = True,
    start: int | tuple[int, int] = 0,
    epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Batches:
    """Batches of `batch_size` rows of every array, epoch after epoch (endless by default).
    `arrays` may hold only some rows (`HeldRows`, see shard.py).

    seed: an int, or a Generator from which one int seed is drawn once (deterministic given
        the Generator's state; pass an int to be able to resume in a new process).
    drop_last: drop each epoch's last incomplete batch, so every batch has the same shape
        (fewer rows than batch_size is then an error). With False the last batch is smaller.
    start: batches already consumed (an int, e.g. the saved step) or `(epoch, index)`.
    epochs: stop before epoch `epochs` (counted from 0, whatever `start`); None = never stop.
    process_index, process_count: this process's slice of each global batch of `batch_size`
        rows (batch_size must divide by process_count; each process gets B / P rows).
    """
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2**63))
    else:
        seed = int(seed) % 2**64  # SeedSequence needs a non-negative entropy
    return Batches(
        arrays,
        batch_size,
        seed,
        drop_last,
        shuffle=shuffle,
        start=start,
        epochs=epochs,
        process_index=process_index,
        process_count=process_count,
    )


def heldout_rows(arrays: Mapping[str, np.ndarray], fraction: float) -> int:
    """Rows set aside for evaluation: `fraction` of them, at least one (none for 0)."""
    return _held_count(arrays["input_ids"].shape[0], fraction)


def _held_count(n: int, fraction: float) -> int:
    return 0 if fraction == 0 else max(1, int(round(n * fraction)))


def heldout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train, heldout)` row indices of `split_heldout` for `n` rows (before any row is
    encoded: a process that encodes only its rows splits the file's rows first)."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = _held_count(n, fraction)
    return order[n_held:], order[:n_held]


def split_heldout(arrays: Mapping[str, np.ndarray], fraction: float, seed: int):
    """`(train, heldout)`: a seeded random `heldout_rows` of the rows held out (None for 0)."""
    train, held = heldout_split(arrays["input_ids"].shape[0], fraction, seed)
    n_held = len(held)
    train_arrays = {k: v[train] for k, v in arrays.items()}
    return train_arrays, ({k: v[held] for k, v in arrays.items()} if n_held else None)
