"""Encoding only this process's rows of a file (see data/shard.py for the assignment).

One process encodes every row, as always. With several processes and `data.on_error=raise`
(the default) each encodes only the rows its slice of the run's batches reads, and the
encoders' counts (truncated texts) are summed over processes, each counting the rows it is
the first to read, so summary.json counts every row the run reads exactly once. Under
`data.on_error=skip` an encoder may drop a row (a prompt too long), which changes the row
count and so every process's shuffle: there every process still encodes every row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np

from rlhf_jax import processes
from rlhf_jax.config import Config
from rlhf_jax.data import DataReport, heldout_split, split_heldout
from rlhf_jax.data.shard import HeldRows, rows_used, select
from rlhf_jax.loops.build_supervised import stage_batches
from rlhf_jax.loops.encoding import RunEncoder
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.sharding import data_parallel_size, local_batch_rows

Encode = Callable[[Sequence, DataReport | None], dict[str, np.ndarray]]


def splits_rows(cfg: Config) -> bool:
    """Whether this run's processes each encode only their own rows."""
    # Rollout filters draw fresh prompts from the whole file for their extra rounds.
    filtered = bool(cfg.ppo.rollout_filters)
    return jax.process_count() > 1 and cfg.data.on_error == "raise" and not filtered


def encode_own_rows(
    examples: Sequence,
    encode: Encode,
    report: DataReport,
    batches: tuple[int, int, int, str],
    runtime: Runtime,
    every_row: bool = False,
) -> HeldRows:
    """`encode(examples, report)` of the rows this process's batches read, as `HeldRows`.
    batches: (global batch size, batches the run takes, the batches' seed, the batch size's
    config key). `every_row`: the stage evaluates every row afterwards, so the rows no batch
    reads are encoded too, shared out between the processes (`_with_unread_share`)."""
    batch_size, n_batches, seed, key_name = batches
    local = local_batch_rows(batch_size, runtime.mesh, runtime.rules, key_name)
    rows, first = rows_used(len(examples), batch_size, seed, n_batches, local)
    if every_row:
        rows, first = _with_unread_share(rows, first, len(examples), batch_size, local)
    return _encode_rows(examples, rows, first, encode, report, (batch_size, local))


def encode_share(
    examples: Sequence, encode: Encode, report: DataReport, runtime: Runtime
) -> HeldRows:
    """A file no batch reads, only evaluated (e.g. the demonstrations an RM's bias is fitted
    on): each group of processes holding one slice of a batch encodes and owns every G-th
    row (G the number of slices)."""
    batch = data_parallel_size(runtime.mesh, runtime.rules)
    local = local_batch_rows(batch, runtime.mesh, runtime.rules)
    size = local.stop - local.start
    rows = np.arange(len(examples))[local.start // size :: batch // size]
    return _encode_rows(examples, rows, np.ones(len(rows), bool), encode, report, (batch, local))


def ordered_rows(n: int, batch_size: int, local: slice, repeat: int = 1) -> np.ndarray:
    """The sorted rows of an `n`-row file that slice `local` of consecutive batches of
    `batch_size` reads (`loops.batched.map_batches`: the last batch padded by repeating the
    final row), each row standing `repeat` times in a row."""
    total = n * repeat
    starts = np.arange(0, total, batch_size)
    read = (starts[:, None] + np.arange(local.start, local.stop)[None, :]).reshape(-1)
    return np.unique(np.minimum(read, total - 1) // repeat)


def encode_ordered(
    examples: Sequence,
    encode: Encode,
    report: DataReport,
    batch_size: int,
    runtime: Runtime,
    repeat: int = 1,
) -> HeldRows:
    """A file evaluated in order, not trained on (e.g. prompts sampled `repeat` times each,
    `map_batches`' consecutive global batches of `batch_size` rows, rounded up to the
    data-parallel size as it rounds it): each process encodes the rows its slice of those
    batches reads, so the batches, and every output, are one process's."""
    dp = data_parallel_size(runtime.mesh, runtime.rules)
    batch_size = -(-batch_size // dp) * dp
    local = local_batch_rows(batch_size, runtime.mesh, runtime.rules)
    rows = ordered_rows(len(examples), batch_size, local, repeat)
    # A row read by two slices (its repeats straddle them) is counted by its first repeat's.
    first = np.isin((rows * repeat) % batch_size, np.arange(local.start, local.stop))
    held = _encode_rows(examples, rows, first, encode, report, (batch_size, local))
    return dataclasses.replace(held, repeat=repeat)


@dataclasses.dataclass
class OrderedShare:
    """A file evaluated in order whose layout depends on how many times each row is sampled
    (the evaluation prompts: `eval.n_samples`, or 1 for greedy answers): this process's
    rows are encoded (`encode_ordered`) on first use of each `repeat`. Every process must
    ask for the same repeats in the same order (encoding sums counts over processes)."""

    examples: Sequence
    encode: Encode
    path: str
    batch_size: int
    runtime: Runtime
    _held: dict[int, HeldRows] = dataclasses.field(default_factory=dict)

    def repeated(self, repeat: int) -> HeldRows:
        """This process's rows for batches in which each row stands `repeat` times."""
        if repeat not in self._held:
            report = DataReport(path=self.path)  # nothing counted: the file was checked
            self._held[repeat] = encode_ordered(
                self.examples, self.encode, report, self.batch_size, self.runtime, repeat
            )
        return self._held[repeat]


def _encode_rows(examples, rows, first, encode: Encode, report: DataReport, batch) -> HeldRows:
    """Rows `rows` of `examples` encoded as `HeldRows` (each process's truncations summed
    over processes: `first` marks the rows this process counts and owns)."""
    batch_size, local = batch
    # The rows this process reads first are encoded with the file's report (their truncations
    # counted), the others without (counted by the process that reads them first).
    mine = select(examples, rows)
    counted = [e for e, f in zip(mine, first) if f]
    others = [e for e, f in zip(mine, first) if not f]
    truncated = report.truncated
    parts = ((counted, report), (others, None))
    encoded = [encode(part, counts) for part, counts in parts if part]
    arrays = {k: np.concatenate([e[k] for e in encoded]) for k in encoded[0]}
    order = np.argsort(np.concatenate([rows[first], rows[~first]]), kind="stable")
    arrays = {k: v[order] for k, v in arrays.items()}
    own = np.asarray(report.truncated - truncated, np.int64)
    report.truncated = truncated + int(processes.gather(own, "truncation counts").sum())
    print(
        f"{report.path}: process {jax.process_index()} of {jax.process_count()} encoded "
        f"{len(rows)} of {len(examples)} rows (those its slice of the batches reads)",
        flush=True,
    )
    return HeldRows(arrays, rows, len(examples), batch_size, local, owner=first)


def _with_unread_share(rows, first, n: int, batch_size: int, local: slice):
    """`rows, first` plus this process's share of the rows no process's batches read (each
    group of processes holding one slice of the batches takes every G-th of them, G the
    number of slices), those counted as first read here."""
    read = np.zeros(n, bool)
    read[rows] = True
    read = processes.gather(read, "rows read").any(axis=0)
    size = local.stop - local.start
    extra = np.flatnonzero(~read)[local.start // size :: batch_size // size]
    order = np.argsort(np.concatenate([rows, extra]), kind="stable")
    rows = np.concatenate([rows, extra])[order]
    return rows, np.concatenate([first, np.ones(len(extra), bool)])[order]


def stage_rankings(
    cfg: Config,
    rankings: Sequence,
    encode: RunEncoder,
    report: DataReport,
    stage: str,
    split: bool = True,
) -> tuple[dict[str, np.ndarray] | HeldRows, dict[str, np.ndarray] | None]:
    """`(train, held out)` of the rankings stage `stage` ("rm" or "dpo") trains on, split by
    its `heldout_fraction`. With several processes (`splits_rows`) the training rows are
    `HeldRows` (this process's, and its share of those no batch reads: the stage evaluates
    every training row afterwards); the held-out rows, a small fraction, are encoded whole
    on every process. `split=False`: every row on every process, whatever the process count
    (a caller whose other stages read every training row)."""
    fraction = getattr(cfg, stage).heldout_fraction
    if not (split and splits_rows(cfg)):
        return split_heldout(encode.rankings(rankings, report, section=stage), fraction, cfg.seed)
    # every row with the file's K (a process's rows alone might hold fewer completions)
    k = max(len(e.completions) for e in rankings)
    enc = functools.partial(encode.rankings, section=stage, k_max=k)
    train_rows, held_rows = heldout_split(len(rankings), fraction, cfg.seed)
    held = enc(select(rankings, held_rows), report) if len(held_rows) else None
    runtime = Runtime.from_config(cfg)
    train = encode_own_rows(
        select(rankings, train_rows), enc, report, stage_batches(cfg, stage), runtime, True
    )
    return train, held
