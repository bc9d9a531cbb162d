"""The RL update's trunk forwards on packed rows (`ppo.pack_update`).

Padded, every experience row computes `max_prompt_len + max_new_tokens` tokens whatever its
prompt and response lengths. Packed, each micro-batch's rows are laid end to end in fewer rows
of the same length, each sequence its own segment (attention within it, positions from 0):
the trunk (the forward and its backward) computes `packed rows x length` tokens. The hidden
states that predict the real response tokens are then gathered into a compact buffer of
response slots per group, where the LM head (log-probs and entropy, top-k/top-p supports
included) and a value head run, so the heads compute no padding either; their per-token
results are put back in the padded `[rows, N]` layout (0 at padding), where every loss runs
unchanged, so a fork's loss sees the same batch either way.

Where each row goes is decided on the device, inside the update (first fit, longest row
first, over one micro-batch's rows of one data-parallel shard: rows never move between
devices). The number of packed rows is a compiled shape, so the host chooses it per
iteration: it runs the same placement over every micro-batch the update will see (the same
shuffles, from the same key) and reads two integers, the most rows and the most real
response tokens any of them needs, each rounded up to a power of two
(`loops/packed_update.PackedUpdate`). The update also counts rows and response tokens that
did not fit (`ppo/pack_overflow`); the host refuses a nonzero count, which would mean the
two counts disagree.

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
    "PackPlan",
    "pack_plan",
    "pack_needs",
    "packed_response_logprobs",
    "packed_response_values",
    "packed_responses",
    "response_slots",
    "row_spans",
]


class PackLayout(NamedTuple):
    """The packed shape of one micro-batch: its rows split into `shards` equal groups (the
    data-parallel shards, so packing never moves a row between devices), each packed into
    `rows` rows, and each group's real response tokens gathered into `tokens` slots, where
    the LM head runs (at most the group's rows x response columns are used)."""

    shards: int
    rows: int
    tokens: int


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
    end: jax.Array  # [M] one past its last real column
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
    to_first = place.bin * s + place.offset
    return PackedGroup(ids, mask, segment_ids, start, end, to_first, place.overflow)


def _grouped(x, shards: int):
    """[M, ...] -> [shards, M / shards, ...]: shard g holds rows g * M / shards on."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


class ResponseSlots(NamedTuple):
    """Where one group's real response tokens go in its compact buffer of `tokens` slots, in
    row order: slot `at[m, j]` for row m's response token j (`tokens`, one past the end, for
    padding and for tokens beyond the buffer), and the packed-row token whose hidden state
    predicts each slot's token (`source`, a flat index into the group's packed rows)."""

    at: jax.Array  # [M, N] int32
    source: jax.Array  # [T] int32
    overflow: jax.Array  # int32: real response tokens beyond the buffer


def response_slots(
    group: PackedGroup, seq_mask_MS: jax.Array, n: int, tokens: int
) -> ResponseSlots:
    """The compact slots of one group's real response tokens (`seq_mask` 1 at column
    P + j). The hidden state that predicts token j is at column P - 1 + j, clipped into the
    row's real span (a row with an empty prompt reads its own first token: finite, and
    what the padded update computes there is not a prediction either)."""
    m, s = seq_mask_MS.shape
    p = s - n
    real = seq_mask_MS[:, p:] != 0
    order = jnp.cumsum(real.reshape(-1)).reshape(m, n) - 1
    at = jnp.where(real & (order < tokens), order, tokens).astype(jnp.int32)
    start, end = group.start[:, None], group.end[:, None]
    cols = jnp.clip(
        p - 1 + jnp.arange(n, dtype=jnp.int32)[None, :], start, jnp.maximum(end - 1, start)
    )
    flat = group.to_packed[:, None] + cols - start
    rows_s = group.ids.shape[0] * s
    source = jnp.zeros(tokens + 1, jnp.int32).at[at.reshape(-1)].set(flat.reshape(-1))[:-1]
    overflow = jnp.maximum(jnp.sum(real) - tokens, 0).astype(jnp.int32)
    return ResponseSlots(at, jnp.clip(source, 0, rows_s - 1), overflow)


def to_slots(values_MN_: jax.Array, slots: ResponseSlots) -> jax.Array:
    """[M, N, ...] -> [T, ...]: each real response token's value in its slot, 0 in unused
    slots."""
    t = slots.source.shape[0]
    rest = values_MN_.shape[2:]
    out = jnp.zeros((t + 1, *rest), values_MN_.dtype)
    flat = values_MN_.reshape(-1, *rest)
    return out.at[slots.at.reshape(-1)].set(flat)[:-1]


def from_slots(values_T: jax.Array, slots: ResponseSlots) -> jax.Array:
    """[T] -> [M, N]: each real response token's value from its slot, 0 at padding."""
    padded = jnp.concatenate([values_T, jnp.zeros((1,), values_T.dtype)])
    return padded[slots.at]


class PackPlan(NamedTuple):
    """Where one micro-batch's rows and real response tokens go: each group's packed rows
    (`PackedGroup`) and response slots (`ResponseSlots`), batched over the shards. It reads
    no weights, so the policy and a separate critic share one (`pack_plan`)."""

    groups: PackedGroup
    slots: ResponseSlots
    overflow: jax.Array  # int32: rows and response tokens that did not fit


def pack_plan(seq_ids, seq_mask, n: int, layout: PackLayout) -> PackPlan:
    """Each group's rows packed into `layout.rows` rows (`first_fit`), and its real response
    tokens (the last `n` columns) given `layout.tokens` slots (at most the group's rows x
    `n`)."""
    groups = jax.vmap(lambda i, m: pack_rows(i, m, layout.rows))(
        _grouped(seq_ids, layout.shards), _grouped(seq_mask, layout.shards)
    )
    tokens = min(layout.tokens, seq_ids.shape[0] // layout.shards * n)
    slots = jax.vmap(lambda g, mask: response_slots(g, mask, n, tokens))(
        groups, _grouped(seq_mask, layout.shards)
    )
    return PackPlan(groups, slots, jnp.sum(groups.overflow) + jnp.sum(slots.overflow))


def packed_responses(cfg: ModelConfig, params, plan: PackPlan) -> jax.Array:
    """[shards, T, D]: the trunk on the plan's packed rows, then the hidden states that
    predict each real response token, gathered into the groups' slots."""
    shards, rows, s = plan.groups.ids.shape
    flat = lambda x: x.reshape(shards * rows, s)  # noqa: E731
    g = plan.groups
    h = hidden_states(cfg, params, flat(g.ids), flat(g.mask), flat(g.segment_ids))
    per_group = h.reshape(shards, rows * s, h.shape[-1])
    return jax.vmap(lambda vals, src: vals[src])(per_group, plan.slots.source)


def _to_padded(values_GT: jax.Array, slots: ResponseSlots) -> jax.Array:
    """[shards, T] slot values -> [M, N] (0 at padding)."""
    out = jax.vmap(from_slots)(values_GT, slots)
    return out.reshape(-1, out.shape[-1])


def packed_response_logprobs(
    cfg: ModelConfig,
    params,
    plan: PackPlan,
    response_ids: jax.Array,
    temperature: float,
    *,
    support: jax.Array | None,
    values: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`experience.response_logprobs` from the plan's packed rows: the LM head (and a shared
    critic's value head) run on the real response tokens' slots only, and their results are
    put back in the padded `[M, N]` layout (0 at padding)."""
    hidden = packed_responses(cfg, params, plan)
    shards = hidden.shape[0]

    def grouped(x):  # an unused slot scores token 0 over an empty support: finite, dropped
        return jax.vmap(to_slots)(_grouped(x, shards), plan.slots)

    support_GT = None if support is None else grouped(support)
    out = logprobs_from_hidden(
        cfg, params, hidden, grouped(response_ids), temperature, support_GT, values
    )
    logp, entropy, vals = (None if x is None else _to_padded(x, plan.slots) for x in out)
    return logp, entropy, vals


def packed_response_values(cfg: ModelConfig, params, plan: PackPlan) -> jax.Array:
    """[M, N]: a separate critic's values (`experience.response_values`: `params` holds
    `trunk` and `head`) at the real response tokens' slots of the plan's packed rows, 0 at
    padding."""
    hidden = packed_responses(cfg, params["trunk"], plan)
    return _to_padded(scalar_head(params["head"], hidden), plan.slots)


def pack_needs(
    seq_mask_BS: jax.Array,
    key: jax.Array,
    *,
    response_len: int,
    epochs: int,
    minibatch: int,
    grad_accum: int,
    shards: int,
) -> jax.Array:
    """int32 [2]: the most packed rows, and the most real response tokens, any group of the
    update needs, over every epoch's shuffle (`rl_update.update`'s keys and permutations),
    minibatch, micro-batch (`accumulation.micro_batches`: rows j, j + n, ...) and shard. Run
    on device; the host reads the two numbers."""
    b, s = seq_mask_BS.shape
    start, end = row_spans(seq_mask_BS)
    lengths = end - start
    responses = jnp.sum(seq_mask_BS[:, s - response_len :] != 0, axis=1).astype(jnp.int32)
    per_group = minibatch // grad_accum // shards

    def epoch(k):
        order = jax.random.permutation(k, b).reshape(b // minibatch, minibatch)

        def groups(per_row):  # [B] -> [groups, per_group], the update's grouping
            x = per_row[order]  # [n_mb, M]
            micro = x.reshape(b // minibatch, minibatch // grad_accum, grad_accum)
            return micro.swapaxes(1, 2).reshape(-1, per_group)

        used = jax.vmap(lambda g: first_fit(g, s, per_group).used)(groups(lengths))
        return jnp.stack([jnp.max(used), jnp.max(jnp.sum(groups(responses), axis=1))])

    return jnp.max(jax.vmap(epoch)(jax.random.split(key, epochs)), axis=0).astype(jnp.int32)
