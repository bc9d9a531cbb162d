"""Deterministic, resumable batches over the rows of a dict of equal-length arrays.

Epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation(N)`: a
fresh shuffle every epoch, and any position `(epoch, index)` can be reached directly, with no
replay, so a run resumes where it stopped by saving `iterator.position` in its checkpoint and
passing it back as `start`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from rlhf_jax.errors import RlhfJaxError


class Batches(Iterator[dict[str, np.ndarray]]):
    """Iterator of batches (dicts of row-indexed copies); see `batches`."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        shuffle: bool = True,
        start: tuple[int, int] = (0, 0),
        epochs: int | None = None,
    ):
        if not arrays:
            raise RlhfJaxError("batches: no arrays given")
        sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if n is None or any(s != n for s in sizes.values()):
            raise RlhfJaxError(f"batches: arrays must share their leading dimension, got {sizes}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RlhfJaxError(f"batch size must be a positive integer, got {batch_size!r}")
        self.arrays = dict(arrays)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.epochs = shuffle, epochs
        self.per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        if self.per_epoch == 0:
            raise RlhfJaxError(
                f"only {n} rows of data for a batch size of {batch_size} (drop_last=True)"
            )
        epoch, index = start
        if epoch < 0 or not 0 <= index <= self.per_epoch:
            raise RlhfJaxError(
                f"batches: start {start} is outside 0 <= index <= {self.per_epoch} batches/epoch"
            )
        self._epoch, self._index = (epoch + 1, 0) if index == self.per_epoch else (epoch, index)
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def position(self) -> tuple[int, int]:
        """`(epoch, index)` of the next batch: pass it as `start` to resume there."""
        return self._epoch, self._index

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch`."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.order(self._epoch), self._epoch
        lo = self._index * self.batch_size
        rows = self._order[lo : lo + self.batch_size]
        self._index += 1
        if self._index == self.per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return {k: v[rows] for k, v in self.arrays.items()}


def batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    rng: int | np.random.Generator = 0,
    drop_last: bool = True,
    *,
    shuffle: bool = True,
    start: tuple[int, int] = (0, 0),
    epochs: int | None = None,
) -> Batches:
    """Batches of `batch_size` rows of every array, epoch after epoch (endless by default).

    rng: an int seed, or a Generator from which one seed is drawn once (so, deterministic
        given the Generator's state; pass an int to be able to resume).
    drop_last: drop each epoch's last incomplete batch, so every batch has the same shape
        (fewer rows than batch_size is then an error). With False the last batch is smaller.
    start: `(epoch, index)` of the first batch, e.g. a saved `Batches.position`.
    epochs: stop before epoch `epochs` (counted from 0, whatever `start`); None = never stop.
    """
    if isinstance(rng, np.random.Generator):
        seed = int(rng.integers(0, 2**63))
    else:
        seed = int(rng) % 2**64  # SeedSequence needs a non-negative entropy
    return Batches(arrays, batch_size, seed, drop_last, shuffle, start, epochs)
