"""The decode loop of `generate`: one `lax.while_loop` per batch size, rows that ended
compacted out at power-of-two boundaries ("stop in buckets").

A batch of B rows decodes at B rows until at most B/2 rows are still alive; then the alive
rows are gathered (cache, mask, logits, positions) into a batch of B/2 and decoding goes on
there, down to the smallest size (`stage_sizes`). A finished row so stops costing within a
factor of two: 7 rows that end after 9 tokens and 1 that runs to N cost about 8 x 9 + 1 x N
row-steps, not 8 x N. Every row keeps its own random draw (`sampling.DrawRows`), so the
tokens are the ones the full batch would have drawn; outputs stay [B, N], written by row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import KVCache, cache_batch_axis, forward_cached
from rlhf_jax.rollout.sampling import sample_token_and_support


class Spec(NamedTuple):
    """What the loop reads of the `SamplingSpec` (kept apart to avoid an import cycle)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    pad_id: int


class Decoder(NamedTuple):
    """What every decode step reads and never changes."""

    config: ModelConfig
    params: dict  # per-layer weights (`split_layers`), or stacked for the layer scan
    rng: jax.Array
    spec: Spec
    eos_arr: jax.Array  # [E] int32 the EOS ids ([-1] for none)
    prompt_len: int  # slot of generated token 0
    rows: int  # the batch's full row count (outputs are [rows, N])


class DecodeLoopState(NamedTuple):
    step: jax.Array  # scalar int32: index of the token being chosen
    cache: KVCache
    kv_mask_BS: jax.Array
    logits_BV: jax.Array  # next-token logits
    position_B: jax.Array  # position of the token being chosen
    done_B: jax.Array
    rows_B: jax.Array  # the output row of each batch row (`Decoder.rows` for a filler row)
    tokens_BN: jax.Array  # outputs: [Decoder.rows, N] whatever the batch size
    logprobs_BN: jax.Array
    mask_BN: jax.Array
    support_BNW: jax.Array | None


def _write(out: jax.Array, value: jax.Array, s: DecodeLoopState, full: bool) -> jax.Array:
    """Column `s.step` of each row's output; a compacted batch writes by row index (filler
    rows, index `rows`, are dropped)."""
    if full:
        start = (0, s.step) + (0,) * (out.ndim - 2)
        return jax.lax.dynamic_update_slice(out, value[:, None], start)
    return out.at[s.rows_B, s.step].set(value, mode="drop")


def choose(dec: Decoder, s: DecodeLoopState) -> tuple:
    """Pick token `s.step` from the current logits and record it."""
    spec = dec.spec
    full = s.done_B.shape[0] == dec.rows
    token_B, logp_B, support_BW = sample_token_and_support(
        s.logits_BV,
        jax.random.fold_in(dec.rng, s.step),
        spec.temperature,
        spec.top_k,
        spec.top_p,
        None if full else (s.rows_B, dec.rows),
    )
    alive_B = ~s.done_B
    token_B = jnp.where(alive_B, token_B, spec.pad_id)
    tokens_BN = _write(s.tokens_BN, token_B, s, full)
    logprobs_BN = _write(s.logprobs_BN, jnp.where(alive_B, logp_B, 0.0), s, full)
    mask_BN = _write(s.mask_BN, alive_B.astype(jnp.float32), s, full)
    support_BNW = s.support_BNW
    if support_BNW is not None:
        support_BW = jnp.where(alive_B[:, None], support_BW, jnp.uint32(0))
        support_BNW = _write(support_BNW, support_BW, s, full)
    done_B = s.done_B | (alive_B & jnp.isin(token_B, dec.eos_arr))
    return token_B, done_B, tokens_BN, logprobs_BN, mask_BN, support_BNW


def _more(n: int, floor: int | None, s: DecodeLoopState) -> jax.Array:
    """Whether this loop goes on: tokens left to choose, a row alive and, unless this is the
    smallest batch, more than `floor` rows alive (else the next, smaller batch takes over).
    The last token is chosen after the loop: it needs no forward pass of its own."""
    alive = ~s.done_B
    more = (s.step < n - 1) & jnp.any(alive)
    if floor is not None:
        more = more & (jnp.sum(alive) > floor)
    return more


def decode_step(dec: Decoder, s: DecodeLoopState) -> DecodeLoopState:
    """Choose token `s.step`, then feed it through the model for the next logits."""
    token_B, done_B, tokens_BN, logprobs_BN, mask_BN, support_BNW = choose(dec, s)
    b = token_B.shape[0]
    slot = dec.prompt_len + s.step
    kv_mask_BS = jax.lax.dynamic_update_slice(s.kv_mask_BS, jnp.ones((b, 1), jnp.int32), (0, slot))
    logits_B1V, cache = forward_cached(
        dec.config, dec.params, token_B[:, None], s.position_B[:, None], s.cache, kv_mask_BS, slot
    )
    return DecodeLoopState(
        s.step + 1,
        cache,
        kv_mask_BS,
        logits_B1V[:, 0],
        s.position_B + 1,
        done_B,
        s.rows_B,
        tokens_BN,
        logprobs_BN,
        mask_BN,
        support_BNW,
    )


def stage_sizes(rows: int, shards: int = 1, compact: bool = True) -> tuple[int, ...]:
    """Batch sizes the loop runs at: `rows`, then halves while they stay whole multiples of
    `shards` (the devices the batch is split over). Each size is one more compiled loop."""
    sizes = [rows]
    while compact and sizes[-1] % 2 == 0 and (sizes[-1] // 2) % shards == 0:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def compacted(s: DecodeLoopState, size: int, rows: int) -> DecodeLoopState:
    """The alive rows of `s` gathered into a batch of `size` (>= their count), in order;
    filler rows are done and write nowhere (row index `rows`)."""
    b = s.done_B.shape[0]
    (index,) = jnp.nonzero(~s.done_B, size=size, fill_value=b)
    filler = index >= b

    def take(x: jax.Array, axis: int = 0) -> jax.Array:
        return jnp.take(x, index, axis=axis, mode="clip")

    axis = cache_batch_axis(s.cache)
    return s._replace(
        cache=jax.tree.map(lambda x: take(x, axis), s.cache),
        kv_mask_BS=take(s.kv_mask_BS),
        logits_BV=take(s.logits_BV),
        position_B=take(s.position_B),
        done_B=take(s.done_B) | filler,
        rows_B=jnp.where(filler, rows, take(s.rows_B)),
    )


def run(dec: Decoder, init: DecodeLoopState, sizes: tuple[int, ...]) -> DecodeLoopState:
    """The decode loops over `sizes` (`stage_sizes`), then the last token's choice: the
    final state's outputs hold all N tokens."""
    n = dec.spec.max_new_tokens
    s = init
    for i, size in enumerate(sizes):
        if i:
            s = compacted(s, size, dec.rows)
        floor = sizes[i + 1] if i + 1 < len(sizes) else None
        s = jax.lax.while_loop(
            functools.partial(_more, n, floor), functools.partial(decode_step, dec), s
        )
        if floor is not None:
            # Out of tokens with more rows alive than the next size holds: choose the last
            # token here; every row is then done and the smaller loops run no step.
            s = jax.lax.cond(s.step >= n - 1, functools.partial(_last, dec), lambda s: s, s)
    return _last(dec, s)


def _last(dec: Decoder, s: DecodeLoopState) -> DecodeLoopState:
    """Choose token `s.step`, the last (N - 1, or after an early exit the next one: every
    row is done, so it writes padding with mask 0, what the loop would have written); every
    row is done after it."""
    _, _, tokens_BN, logprobs_BN, mask_BN, support_BNW = choose(dec, s)
    return s._replace(
        done_B=jnp.ones_like(s.done_B),
        tokens_BN=tokens_BN,
        logprobs_BN=logprobs_BN,
        mask_BN=mask_BN,
        support_BNW=support_BNW,
    )
