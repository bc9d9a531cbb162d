"""Rows read in order (`process_rows.ordered_rows` / `encode_ordered`, what the pipeline's
sampling of the RM and evaluation prompts reads on each process) against a plain loop over
the batches, and `map_batches` over such held rows against the same rows repeated in full."""

import jax
import numpy as np
import pytest

from rlhf_jax.config import DEFAULT_RULES, MeshConfig
from rlhf_jax.data import DataReport
from rlhf_jax.loops.batched import map_batches
from rlhf_jax.loops.process_rows import encode_ordered, ordered_rows
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import make_mesh


def _loop(n: int, batch: int, local: slice, repeat: int) -> list[int]:
    """Every row slice `local` of each padded batch reads, one sample row at a time."""
    total, rows, start = n * repeat, set(), 0
    while start < total:
        for i in range(local.start, local.stop):
            rows.add(min(start + i, total - 1) // repeat)
        start += batch
    return sorted(rows)


@pytest.mark.parametrize("n, batch, repeat", [(48, 256, 4), (16, 128, 1), (37, 8, 3), (5, 4, 1)])
def test_ordered_rows_are_the_rows_each_slice_reads(n, batch, repeat):
    halves = [slice(0, batch // 2), slice(batch // 2, batch)]
    for local in [slice(0, batch), *halves]:
        assert ordered_rows(n, batch, local, repeat).tolist() == _loop(n, batch, local, repeat)
    # together the slices read every row
    both = np.union1d(*(ordered_rows(n, batch, s, repeat) for s in halves))
    assert both.tolist() == list(range(n))


def test_map_batches_over_held_rows_equals_the_repeated_rows():
    runtime = Runtime(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                      DEFAULT_RULES)  # fmt: skip
    examples = [[i, 2 * i] for i in range(11)]

    def encode(rows, report):
        report.truncated += len(rows)  # one per row: the count must cover each row once
        return {"input_ids": np.array(rows, np.int32)}

    report = DataReport(path="rows")
    held = encode_ordered(examples, encode, report, 8, runtime, repeat=3)
    assert held.rows.tolist() == list(range(11)) and report.truncated == 11

    def fn(batch, start):
        return {"x": batch["input_ids"] * 10 + start}

    full = {"input_ids": np.repeat(np.array(examples, np.int32), 3, axis=0)}
    want = map_batches(fn, full, 8, with_offset=True)
    got = map_batches(fn, held, 8, with_offset=True, runtime=runtime)
    np.testing.assert_array_equal(got["x"], want["x"])
    assert got["x"].shape == (33, 2)
