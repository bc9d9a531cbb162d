"""Rows a process reads (data/shard.py) against the batches themselves: a process holding only
`rows_used` gets the same rows in its slice of every batch as one holding everything, the
slices of all processes together read each row once per visit, and `first` marks each row
the run reads exactly once across the processes."""

import numpy as np
import pytest

from rlhf_jax.data import batches
from rlhf_jax.data.shard import HeldRows, rows_used
from rlhf_jax.errors import RlhfJaxError

N, B, SEED = 23, 8, 5  # 2 full batches per epoch, 7 rows dropped from each epoch


def _arrays():
    ids = np.arange(N * 3, dtype=np.int32).reshape(N, 3)
    return {"input_ids": ids, "mask": np.ones((N, 3), np.float32)}


@pytest.mark.parametrize("n_batches", [1, 2, 5])
def test_a_process_holding_its_rows_sees_its_slices_unchanged(n_batches):
    arrays = _arrays()
    slices = [slice(0, 4), slice(4, 8)]
    seen_first = np.zeros(N, int)
    for local in slices:
        rows, first = rows_used(N, B, SEED, n_batches, local)
        held = HeldRows({k: v[rows] for k, v in arrays.items()}, rows, N, B, local)
        full_it, held_it = batches(arrays, B, SEED), batches(held, B, SEED)
        naive = set()
        for _ in range(n_batches):
            full, part = next(full_it), next(held_it)
            for k in arrays:
                np.testing.assert_array_equal(part[k][local], full[k][local])
                assert part[k].shape == full[k].shape
            naive |= set(full["input_ids"][local, 0] // 3)
        assert sorted(naive) == rows.tolist()  # exactly the rows its slices read
        seen_first[rows[first]] += 1
    # every row the run reads is counted by exactly one process
    read = np.zeros(N, bool)
    it = batches(arrays, B, SEED)
    for _ in range(n_batches):
        read[next(it)["input_ids"][:, 0] // 3] = True
    np.testing.assert_array_equal(seen_first, read.astype(int))


def test_one_epoch_splits_the_rows_between_processes():
    a, _ = rows_used(N, B, SEED, 2, slice(0, 4))
    b, _ = rows_used(N, B, SEED, 2, slice(4, 8))
    assert len(a) == len(b) == 8 and not set(a) & set(b)


def test_resuming_from_a_later_batch_reads_held_rows():
    arrays, local = _arrays(), slice(4, 8)
    rows, _ = rows_used(N, B, SEED, 4, local)
    held = HeldRows({k: v[rows] for k, v in arrays.items()}, rows, N, B, local)
    full, part = batches(arrays, B, SEED, start=3), batches(held, B, SEED, start=3)
    np.testing.assert_array_equal(next(part)["input_ids"][local], next(full)["input_ids"][local])


def test_reading_past_the_chosen_rows_is_an_error():
    arrays, local = _arrays(), slice(0, 4)
    rows, _ = rows_used(N, B, SEED, 1, local)
    held = HeldRows({k: v[rows] for k, v in arrays.items()}, rows, N, B, local)
    it = batches(held, B, SEED, start=1)
    with pytest.raises(RlhfJaxError, match="never encoded here"):
        next(it)


def test_held_rows_only_make_the_batches_they_were_chosen_for():
    arrays, local = _arrays(), slice(0, 4)
    rows, _ = rows_used(N, B, SEED, 1, local)
    held = HeldRows({k: v[rows] for k, v in arrays.items()}, rows, N, B, local)
    with pytest.raises(RlhfJaxError, match="cannot make batches of 4"):
        batches(held, 4, SEED)
