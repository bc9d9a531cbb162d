"""The RL update's trunk forwards on packed rows (`ppo.pack_update`).

Padded, every experience row computes `max_prompt_len + max_new_tokens` tokens whatever its
prompt and response lengths. Packed, each micro-batch's rows are laid end to end in fewer rows
of the same length, each sequence its own segment (attention within it, positions from 0):
the trunk (the forward and its backward) computes `packed rows x length` tokens. The hidden
states that predict the response tokens are then gathered back to the padded `[rows, N]`
layout, where the LM head, the log-probs, the value head and every loss run unchanged, so a
fork's loss sees the same batch either way.

Where each row goes is decided on the device, inside the update (first fit, longest row
first, over one micro-batch's rows of one data-parallel shard: rows never move between
devices). The number of packed rows is a compiled shape, so the host chooses it per
iteration: it runs the same placement over every micro-batch the update will see (the same
shuffles, from the same key) and reads one integer, the most rows any of them needs,
rounded up to a power of two (`loops/packed_update.PackedUpdate`). The update also counts
rows that did not fit (`ppo/pack_overflow_rows`); the host refuses a nonzero count, which
would mean the two placements disagree.

Why it is exact: a real token's hidden state depends on itself and the real tokens before it
in its own sequence. A segment of a packed row attends only within itself and its positions
restart at 0, as a left-padded row's count real tokens only, so every real token's hidden
state is the padded one's up to float rounding (matmuls of other shapes). A row's real
tokens are one contiguous span (the prompt is left-padded, the response ends at its first
EOS); the span from its first to its last real token is packed whole.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models import ModelConfig, hidden_states
from rlhf_jax.models.heads import scalar_head
from rlhf_jax.steps.experience import logprobs_from_hidden

__all__ = [
    "PackLayout",
    "first_fit",
    "pack_rows",
    "packed_hidden",
    "packed_response_hidden",
    "packed_response_logprobs",
    "packed_response_values",
    "row_spans",
    "rows_needed",
]


class PackLayout(NamedTuple):
    """The packed shape of one micro-batch: its rows split into `shards` equal groups (the
    data-parallel shards, so packing never moves a row between devices), each packed into
    `rows` rows."""

    shards: int
    rows: int


def row_spans(seq_mask_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(start, end)` int32 [B]: each row's real tokens are columns [start, end) (0, 0 for a
    row with none)."""
    real = seq_mask_BS != 0
    s = real.shape[1]
    any_real = jnp.any(real, axis=1)
    start = jnp.argmax(real, axis=1).astype(jnp.int32)
    end = (s - jnp.argmax(real[:, ::-1], axis=1)).astype(jnp.int32)
    return jnp.where(any_real, start, 0), jnp.where(any_real, end, 0)


class Placement(NamedTuple):
    """Where each of a group's rows goes: packed row `bin`, from column `offset`."""

    bin: jax.Array  # [M] int32
    offset: jax.Array  # [M] int32
    fitted: jax.Array  # [M] bool: False for a row that fitted nowhere (placed at 0, 0)
    used: jax.Array  # int32: packed rows holding at least one sequence
    overflow: jax.Array  # int32: rows that fitted nowhere


def first_fit(lengths_M: jax.Array, capacity: int, rows: int) -> Placement:
    """First fit decreasing: rows longest first (ties in row order), each into the first of
    `rows` packed rows of `capacity` tokens with room for it."""
    m = lengths_M.shape[0]
    lengths = lengths_M.astype(jnp.int32)
    order = jnp.argsort(-lengths, stable=True)

    def place(fill, length):
        fits = fill + length <= capacity
        r = jnp.argmax(fits).astype(jnp.int32)
        ok = fits[r]
        offset = jnp.where(ok, fill[r], 0)
        fill = fill.at[r].add(jnp.where(ok, length, 0))
        return fill, (jnp.where(ok, r, 0), offset, ok)

    fill, (bins, offsets, ok) = jax.lax.scan(place, jnp.zeros(rows, jnp.int32), lengths[order])
    bin_M = jnp.zeros(m, jnp.int32).at[order].set(bins)
    offset_M = jnp.zeros(m, jnp.int32).at[order].set(offsets)
    fitted = jnp.zeros(m, bool).at[order].set(ok | (lengths[order] == 0))
    used = jnp.sum(fill > 0).astype(jnp.int32)
    overflow = jnp.sum(~fitted).astype(jnp.int32)
    return Placement(bin_M, offset_M, fitted, used, overflow)


class PackedGroup(NamedTuple):
    """One group's rows [M, S] packed into [R, S], and where they went."""

    ids: jax.Array  # [R, S]
    mask: jax.Array  # [R, S] 1 on a real token
    segment_ids: jax.Array  # [R, S] row m's tokens carry m + 1; 0 padding
    start: jax.Array  # [M] the first real column of each source row
    to_packed: jax.Array  # [M] flat index in [R * S] of each source row's first real token
    overflow: jax.Array  # int32


def pack_rows(seq_ids_MS: jax.Array, seq_mask_MS: jax.Array, rows: int) -> PackedGroup:
    """The group's rows packed into `rows` rows of the same length (`first_fit`)."""
    m, s = seq_ids_MS.shape
    start, end = row_spans(seq_mask_MS)
    place = first_fit(end - start, s, rows)
    to_packed = place.bin * s + place.offset - start  # flat index of source column 0
    col = jnp.arange(s, dtype=jnp.int32)[None, :]
    real = (col >= start[:, None]) & (col < end[:, None])
    dump = rows * s  # padding (and rows that fitted nowhere) go to one extra slot, dropped
    target = jnp.where(real & place.fitted[:, None], to_packed[:, None] + col, dump).reshape(-1)

    def scatter(values_MS, fill):
        flat = jnp.full(rows * s + 1, fill, values_MS.dtype).at[target].set(values_MS.reshape(-1))
        return flat[:-1].reshape(rows, s)

    ids = scatter(seq_ids_MS.astype(jnp.int32), 0)
    mask = scatter(seq_mask_MS.astype(jnp.int32), 0)
    seg = jnp.broadcast_to(jnp.arange(1, m + 1, dtype=jnp.int32)[:, None], (m, s))
    segment_ids = scatter(seg, 0)
    return PackedGroup(ids, mask, segment_ids, start, place.bin * s + place.offset, place.overflow)


def _grouped(x, shards: int):
    """[M, ...] -> [shards, M / shards, ...]: shard g holds rows g * M / shards on."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def packed_hidden(cfg: ModelConfig, params, seq_ids, seq_mask, layout: PackLayout):
    """`(hidden [shards * rows, S, D], groups)`: the trunk's final hidden states of the packed
    rows, and each group's `PackedGroup` (batched over the shards)."""
    groups = jax.vmap(lambda i, m: pack_rows(i, m, layout.rows))(
        _grouped(seq_ids, layout.shards), _grouped(seq_mask, layout.shards)
    )
    s = seq_ids.shape[1]
    flat = lambda x: x.reshape(layout.shards * layout.rows, s)  # noqa: E731
    h = hidden_states(cfg, params, flat(groups.ids), flat(groups.mask), flat(groups.segment_ids))
    return h, groups


def _at_source_columns(values_RS_, groups: PackedGroup, layout: PackLayout, cols_MN, s: int):
    """Per source row m and column c of `cols_MN` [M, N]: the packed value at that token
    ([shards * rows, S, ...] -> [M, N, ...]). A column outside the row's real span reads the
    row's nearest real token instead (finite; every loss masks it out)."""
    per_group = values_RS_.reshape(layout.shards, layout.rows * s, *values_RS_.shape[2:])

    def gather(vals, g: PackedGroup, cols):
        idx = g.to_packed[:, None] + cols - g.start[:, None]
        return vals[jnp.clip(idx, 0, layout.rows * s - 1)]

    cols = _grouped(cols_MN, layout.shards)
    out = jax.vmap(gather)(per_group, groups, cols)
    return out.reshape(cols_MN.shape[0], cols_MN.shape[1], *out.shape[3:])


def _response_columns(prompt_len: int, n: int, spans_start, spans_end):
    """[M, N] the column whose hidden state predicts each response token (P - 1 + j),
    clipped into the row's real span so that every gather reads one of its own tokens."""
    cols = prompt_len - 1 + jnp.arange(n, dtype=jnp.int32)[None, :]
    last = jnp.maximum(spans_end - 1, spans_start)
    return jnp.clip(cols, spans_start[:, None], last[:, None])


def packed_response_hidden(
    cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int, layout: PackLayout
) -> tuple[jax.Array, jax.Array]:
    """`(hidden [M, N, D], overflow)`: the hidden states that predict each response token
    (`experience.response_hidden`'s), computed on packed rows; `overflow` counts rows that
    fitted nowhere (0 unless `layout.rows` is below what the rows need)."""
    n = seq_ids.shape[1] - prompt_len
    h, groups = packed_hidden(cfg, params, seq_ids, seq_mask, layout)
    start, end = row_spans(seq_mask)
    cols = _response_columns(prompt_len, n, start, end)
    h_MND = _at_source_columns(h, groups, layout, cols, seq_ids.shape[1])
    return h_MND, jnp.sum(groups.overflow)


def packed_response_logprobs(
    cfg: ModelConfig,
    params,
    seq_ids: jax.Array,
    seq_mask: jax.Array,
    response_ids: jax.Array,
    temperature: float,
    *,
    support: jax.Array | None,
    values: bool,
    layout: PackLayout,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """`experience.response_logprobs` from packed rows, and the overflow count."""
    p = seq_ids.shape[1] - response_ids.shape[1]
    h_MND, overflow = packed_response_hidden(cfg, params, seq_ids, seq_mask, p, layout)
    out = logprobs_from_hidden(cfg, params, h_MND, response_ids, temperature, support, values)
    return (*out, overflow)


def packed_response_values(
    cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int, layout: PackLayout
) -> tuple[jax.Array, jax.Array]:
    """`(values [M, N], overflow)`: a separate critic's values (`experience.response_values`:
    `params` holds `trunk` and `head`) from packed rows."""
    h_MND, overflow = packed_response_hidden(
        cfg, params["trunk"], seq_ids, seq_mask, prompt_len, layout
    )
    return scalar_head(params["head"], h_MND), overflow


def rows_needed(
    seq_mask_BS: jax.Array,
    key: jax.Array,
    epochs: int,
    minibatch: int,
    grad_accum: int,
    shards: int,
) -> jax.Array:
    """int32: the most packed rows any group of the update needs, over every epoch's
    shuffle (`rl_update.update`'s keys and permutations), minibatch, micro-batch
    (`accumulation.micro_batches`: rows j, j + n, ...) and shard. Run on device; the host
    reads the one number."""
    b, s = seq_mask_BS.shape
    start, end = row_spans(seq_mask_BS)
    lengths = end - start
    per_group = minibatch // grad_accum // shards

    def epoch(k):
        order = jax.random.permutation(k, b).reshape(b // minibatch, minibatch)
        ls = lengths[order]  # [n_mb, M]
        micro = ls.reshape(b // minibatch, minibatch // grad_accum, grad_accum).swapaxes(1, 2)
        groups = micro.reshape(-1, per_group)
        used = jax.vmap(lambda g: first_fit(g, s, per_group).used)(groups)
        return jnp.max(used)

    return jnp.max(jax.vmap(epoch)(jax.random.split(key, epochs))).astype(jnp.int32)
