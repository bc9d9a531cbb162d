"""batches: fixed shapes, a fresh shuffle per epoch, determinism, resume, per-process slices."""

import numpy as np
import pytest

from rlhf_jax.data import batches
from rlhf_jax.errors import RlhfJaxError

ARRAYS = {"x": np.arange(20)[:, None], "y": np.arange(20) * 10}


def rows(batch):
    return batch["x"][:, 0].tolist()


def test_epochs_cover_every_row_once_with_a_fresh_shuffle():
    it = batches(ARRAYS, 5, seed=1)
    epochs = [[r for _ in range(4) for r in rows(next(it))] for _ in range(3)]
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert it.position == (3, 0) and it.consumed == 12


def test_rows_stay_aligned_across_arrays_and_shapes_are_fixed():
    it = batches(ARRAYS, 6, seed=0)  # 20 rows: 3 batches of 6 per epoch, 2 rows dropped
    for _ in range(7):
        b = next(it)
        assert b["x"].shape == (6, 1) and b["y"].shape == (6,)
        np.testing.assert_array_equal(b["y"], b["x"][:, 0] * 10)


def test_deterministic_per_seed():
    a, b, c = (batches(ARRAYS, 4, seed=s) for s in (7, 7, 8))
    first = [rows(next(a)) for _ in range(10)]
    assert first == [rows(next(b)) for _ in range(10)]
    assert first != [rows(next(c)) for _ in range(10)]
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert rows(next(batches(ARRAYS, 4, g1))) == rows(next(batches(ARRAYS, 4, g2)))


def test_batches_resume_and_split_across_processes():
    arrays = {"x": np.arange(20)[:, None]}
    full = batches(arrays, 4, seed=3)
    expected = [rows(next(full)) for _ in range(12)]  # spans 2+ epochs
    resumed = batches(arrays, 4, seed=3, start=7)
    assert [rows(next(resumed)) for _ in range(5)] == expected[7:]
    by_position = batches(arrays, 4, seed=3, start=(1, 2))  # 5 batches per epoch: step 7
    assert rows(next(by_position)) == expected[7]
    halves = [batches(arrays, 4, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for want in expected[:6]:
        assert rows(next(halves[0])) + rows(next(halves[1])) == want
    with pytest.raises(RlhfJaxError, match="does not divide across 3 processes"):
        next(batches(arrays, 4, seed=0, process_count=3))


def test_drop_last_false_epochs_and_no_shuffle():
    it = batches(ARRAYS, 6, seed=0, drop_last=False, shuffle=False, epochs=2)
    sizes = [len(rows(b)) for b in it]
    assert sizes == [6, 6, 6, 2] * 2
    ordered = batches(ARRAYS, 10, shuffle=False, epochs=1)
    assert [rows(b) for b in ordered] == [list(range(10)), list(range(10, 20))]


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(batch_size=32), "only 20 rows of data for a batch size of 32"),
        (dict(batch_size=0), "batch size must be a positive integer"),
        (dict(batch_size=4, start=(0, 9)), "start"),
        (dict(batch_size=4, start=-1), "start must be >= 0"),
        (dict(batch_size=4, process_index=2, process_count=2), "process index 2"),
        (dict(batch_size=4, process_count=2, drop_last=False), "drop_last=True"),
    ],
)
def test_bad_arguments(kwargs, text):
    with pytest.raises(RlhfJaxError, match=text):
        batches(ARRAYS, **kwargs)


def test_arrays_must_share_their_leading_dimension():
    with pytest.raises(RlhfJaxError, match="leading dimension"):
        batches({"a": np.zeros(3), "b": np.zeros(4)}, 1)
