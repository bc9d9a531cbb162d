"""Compiled generation: prefill the prompt into a preallocated KV cache, then decode inside
`lax.while_loop`s (`rollout.decode`: one per batch size, finished rows compacted out). One
compile per (shape, sampling settings); no Python per token. A group of G samples per prompt
prefills the prompt once; `continue_generate` goes on after the host appends tokens.

Cache layout: slots [0, P) hold the (padded) prompt, slot P + t the t-th generated token.
`kv_mask` marks real slots, so left-, right- or un-padded prompts all work, and a token's
position counts only real tokens before it (what the model saw in training).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.axes import active_resolver
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import last_token_index
from rlhf_jax.models.transformer import (
    KVCache,
    cache_batch_axis,
    forward_cached,
    init_cache,
    positions_from_mask,
    split_layers,
)
from rlhf_jax.ops.logprobs import support_width, truncates
from rlhf_jax.rollout.decode import DecodeLoopState, Decoder, Spec, run, stage_sizes


class GenerateOutput(NamedTuple):
    """Generated continuation of each prompt; N = max_new_tokens.

    tokens:   [B, N] int32, `pad_id` after a row's first EOS.
    logprobs: [B, N] float32, log-prob of each token under the sampling distribution, 0 on padding.
    mask:     [B, N] float32, 1 for generated tokens up to and including the first EOS.
    support:  [B, N, ceil(V / 32)] uint32, the tokens each one was drawn from, packed
              (`ops.pack_support`; all zero on padding); only with `record_support` and a
              top-k / top-p that truncates, else None.
    state:    with `return_state`, the `DecodeState` to continue from, else None.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    support: jax.Array | None = None
    state: DecodeState | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """How `generate` samples, checked and normalised (`SamplingSpec.of`); hashable, so one
    compiled program serves every call with the same spec and shapes."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int | None = None
    top_p: float | None = None
    eos_ids: tuple[int, ...] = ()  # a row stops after emitting one; () never stops early
    pad_id: int = 0  # written after a row stops
    record_support: bool = False  # also return the token set each token was drawn from

    @classmethod
    def of(
        cls,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | Sequence[int] | None = None,
        pad_id: int | None = None,
        record_support: bool = False,
    ) -> SamplingSpec:
        """The spec of `generate`'s keyword arguments (same meanings), or a ValueError that
        names the bad one."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if eos_id is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos_id, int):
            eos_ids = (eos_id,)
        else:
            eos_ids = tuple(int(e) for e in eos_id)
        if pad_id is None:
            pad_id = eos_ids[0] if eos_ids else 0
        return cls(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_k=None if top_k is None else int(top_k),
            top_p=None if top_p is None else float(top_p),
            eos_ids=eos_ids,
            pad_id=int(pad_id),
            record_support=bool(record_support),
        )


class DecodeState(NamedTuple):
    """Where a `generate` (with `return_state=True`) left off, for `continue_generate` to go on
    after the host appends tokens (a tool's answer, the next user turn).

    cache:        per layer k and v [B, kv_heads, S, head_dim] (stacked [L, ...] after a
                  `layer_scan` call, which a continuation then keeps); slot P + t holds generated
                  token t for t < N - 1 (the last one was chosen without a forward).
    kv_valid_BS:  [B, S] int32, 1 where a slot holds a real token (prompt padding and the
                  padding after a row's EOS are 0).
    last_token_B: [B] int32, the last generated token, not yet in the cache.
    last_valid_B: [B] int32, 1 when that token is real (the row had not ended before it).
    """

    cache: KVCache
    kv_valid_BS: jax.Array
    last_token_B: jax.Array
    last_valid_B: jax.Array


def _batch_shards(rows: int) -> int:
    """How many devices the batch axis of a `rows`-row activation is split over (1 without
    sharding rules): compacted batches stay multiples of it."""
    resolve = active_resolver()
    sharding = None if resolve is None else resolve(("batch",), (rows,))
    return 1 if sharding is None else rows // sharding.shard_shape((rows,))[0]


@functools.partial(
    jax.jit,
    static_argnames=("config", "spec", "activations", "fan_out", "compact", "keep", "layer_scan"),
)
def _generate(
    config,
    params,
    prompt_ids_BP,
    prompt_mask_BP,
    rng,
    *,
    spec: SamplingSpec,
    activations,
    fan_out: int = 1,
    compact: bool = False,
    keep: bool = False,
    layer_scan: bool = False,
) -> GenerateOutput:
    del activations  # only a cache key: the model reads the same resolver while tracing
    b, p = prompt_ids_BP.shape
    n = spec.max_new_tokens
    prompt_mask_BP = prompt_mask_BP.astype(jnp.int32)
    config, params = _decode_weights(config, params, layer_scan)
    # The last generated token is never fed back, so the cache needs P + N - 1 slots.
    cache = init_cache(config, b, p + n - 1, stacked=layer_scan)
    kv_mask_BS = jnp.zeros((b, p + n - 1), jnp.int32).at[:, :p].set(prompt_mask_BP)
    logits_B1V, cache = forward_cached(
        config,
        params,
        prompt_ids_BP,
        positions_from_mask(prompt_mask_BP),
        cache,
        kv_mask_BS,
        jnp.int32(0),
        logits_index_B=last_token_index(prompt_mask_BP),
    )
    position_B = jnp.sum(prompt_mask_BP, axis=-1)
    if fan_out > 1:  # each prompt prefilled once; its G samples start from copies
        axis = cache_batch_axis(cache)
        cache = jax.tree.map(lambda x: jnp.repeat(x, fan_out, axis=axis), cache)
        prefilled = (kv_mask_BS, logits_B1V, position_B)
        kv_mask_BS, logits_B1V, position_B = jax.tree.map(
            lambda x: jnp.repeat(x, fan_out, axis=0), prefilled
        )
    start = _Start(cache, kv_mask_BS, logits_B1V[:, 0], position_B, p)
    return _decode(config, params, rng, spec, start, compact=compact, keep=keep)


class _Start(NamedTuple):
    """A prefilled batch, ready to decode."""

    cache: KVCache
    kv_mask_BS: jax.Array
    logits_BV: jax.Array
    position_B: jax.Array
    prompt_len: int  # slot of generated token 0


def _decode(
    config, params, rng, spec: SamplingSpec, start: _Start, *, compact: bool, keep: bool
) -> GenerateOutput:
    """Decode N tokens after a prefill; with `keep`, also the `DecodeState` to continue from
    (then no compaction: a continuation needs every row's cache)."""
    b, v = start.logits_BV.shape
    n = spec.max_new_tokens
    support_BNW = None
    if spec.record_support and spec.temperature != 0 and truncates(spec.top_k, spec.top_p, v):
        support_BNW = jnp.zeros((b, n, support_width(v)), jnp.uint32)
    loop_spec = Spec(n, spec.temperature, spec.top_k, spec.top_p, spec.pad_id)
    eos_arr = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)
    dec = Decoder(config, params, rng, loop_spec, eos_arr, start.prompt_len, b)
    init = DecodeLoopState(
        step=jnp.int32(0),
        cache=start.cache,
        kv_mask_BS=start.kv_mask_BS,
        logits_BV=start.logits_BV,
        position_B=start.position_B,
        done_B=jnp.zeros((b,), bool),
        rows_B=jnp.arange(b, dtype=jnp.int32),
        tokens_BN=jnp.full((b, n), spec.pad_id, jnp.int32),
        logprobs_BN=jnp.zeros((b, n), jnp.float32),
        mask_BN=jnp.zeros((b, n), jnp.float32),
        support_BNW=support_BNW,
    )
    # Without an EOS no row ends early: one loop, nothing more to compile.
    compact = compact and not keep and bool(spec.eos_ids)
    final = run(dec, init, stage_sizes(b, _batch_shards(b), compact))
    state = None
    if keep:
        generated_BS = final.mask_BN[:, : n - 1].astype(jnp.int32)
        state = DecodeState(
            final.cache,
            jnp.concatenate([start.kv_mask_BS[:, : start.prompt_len], generated_BS], axis=1),
            final.tokens_BN[:, n - 1],
            final.mask_BN[:, n - 1].astype(jnp.int32),
        )
    return GenerateOutput(
        final.tokens_BN, final.logprobs_BN, final.mask_BN, final.support_BNW, state
    )


@functools.partial(jax.jit, static_argnames=("config", "spec", "activations", "keep"))
def _continue(
    config, params, state: DecodeState, ids_BA, mask_BA, rng, *, spec, activations, keep
) -> GenerateOutput:
    """The continuation; it decodes the way the state was made (a stacked cache: the layer
    scan)."""
    del activations
    s = state.kv_valid_BS.shape[1]
    n = spec.max_new_tokens
    # The chunk fed now: the last generated token, then the appended ones.
    chunk_ids_BT = jnp.concatenate([state.last_token_B[:, None], ids_BA], axis=1)
    chunk_mask_BT = jnp.concatenate([state.last_valid_B[:, None], mask_BA], axis=1)
    t = chunk_ids_BT.shape[1]
    layer_scan = cache_batch_axis(state.cache) == 1
    config, params = _decode_weights(config, params, layer_scan)
    grow = ((0, 0),) * (1 + layer_scan) + ((0, 0), (0, t + n - 1), (0, 0))
    cache = jax.tree.map(lambda x: jnp.pad(x, grow), state.cache)
    b = chunk_ids_BT.shape[0]
    kv_mask_BS = jnp.concatenate(
        [state.kv_valid_BS, chunk_mask_BT, jnp.zeros((b, n - 1), jnp.int32)], axis=1
    )
    # Positions count real tokens only, as `generate` counts them over a whole prompt.
    positions_BT = positions_from_mask(kv_mask_BS[:, : s + t])[:, s:]
    logits_B1V, cache = forward_cached(
        config,
        params,
        chunk_ids_BT,
        positions_BT,
        cache,
        kv_mask_BS,
        jnp.int32(s),
        logits_index_B=last_token_index(chunk_mask_BT),
    )
    position_B = jnp.sum(kv_mask_BS, axis=-1)
    start = _Start(cache, kv_mask_BS, logits_B1V[:, 0], position_B, s + t)
    return _decode(config, params, rng, spec, start, compact=False, keep=keep)


def _decode_weights(config: ModelConfig, params, layer_scan: bool) -> tuple[ModelConfig, dict]:
    """The weights as every decode step reads them. With `layer_scan` the stacked weights
    as they are (the layer scan slices one layer at a time: no copy of the whole model).
    Else per-layer slices, made once here, not
    inside every step (XLA:CPU cannot feed a matmul a slice in place: slicing inside the
    step copied each layer's weights at every step, 61 -> 101 ms per step at 6L/512d, and
    left the compiled temporaries as they were); a tied LM head as its own [D, V] copy,
    made once per call: read as `embed.T` inside the loop, the head's GEMM ran on the
    transposed [V, D] operand, slower on XLA:CPU (decode step at vocab 50257, batch 8:
    9.0-9.1 -> 7.5-8.2 ms; within noise at 8192). The per-layer slices are a second copy
    of every layer's weights for the whole call (13 GiB at the 8B shape in bf16)."""
    if not layer_scan:
        params = split_layers(params)
    if config.tie_embeddings:
        params = {**params, "lm_head": params["embed"].T}
        config = dataclasses.replace(config, tie_embeddings=False)
    return config, params


def _spec(max_new_tokens: int | None, spec: SamplingSpec | None, **keywords) -> SamplingSpec:
    if spec is None:
        if max_new_tokens is None:
            raise ValueError("generate needs max_new_tokens (or a SamplingSpec)")
        return SamplingSpec.of(max_new_tokens, **keywords)
    if max_new_tokens is not None:
        raise ValueError("generate takes max_new_tokens or a SamplingSpec, not both")
    return spec


def generate(
    config: ModelConfig,
    params,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    max_new_tokens: int | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    record_support: bool = False,
    spec: SamplingSpec | None = None,
    samples_per_prompt: int = 1,
    compact: bool = False,
    return_state: bool = False,
    layer_scan: bool = False,
) -> GenerateOutput:
    """Sample up to `max_new_tokens` tokens after each prompt.

    Args:
      prompt_ids, prompt_mask: [P, L] padded prompts (left padding is usual; any works).
      rng: a JAX PRNG key; each step uses `fold_in(rng, step)`.
      temperature: 0 means greedy (argmax).
      top_k, top_p: optional truncation of the sampling distribution.
      eos_id: one id or several; a row stops after emitting one (it is kept, mask 1).
        None: never stop early.
      pad_id: token written after a row stops (default: the first EOS id, else 0).
      record_support: also return the set of tokens each one was drawn from (`support`),
        which RL needs to take every log-prob over the sampling distribution's support.
      spec: all of the above as one `SamplingSpec` instead (then give none of them).
      samples_per_prompt: G; each prompt is prefilled once and answered G times, rows
        p*G .. p*G + G - 1 (the outputs have P*G rows: what `jnp.repeat(prompts, G, 0)` gives).
      compact: once at most half the rows are alive, go on with the alive rows in a batch of
        half the size (`rollout.decode`): time follows the tokens generated. The same tokens;
        log-probs may differ from the full batch's in the last float bits (a smaller matmul
        rounds differently on XLA:CPU), so it is off unless asked for.
      return_state: also return the `DecodeState` (`GenerateOutput.state`) that
        `continue_generate` goes on from (this turns `compact` off).
      layer_scan: run the layers as a scan over the stacked weights with a stacked KV cache,
        instead of unrolled over per-layer copies of the weights made once per call: no
        second copy of the model's layers, at the cost of XLA:CPU copying each layer's
        weights at every decode step (slower on CPU; docs/memory.md, "Fitting 80 GB").
        The same tokens and log-probs up to float rounding.
    """
    spec = _spec(
        max_new_tokens,
        spec,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        pad_id=pad_id,
        record_support=record_support,
    )
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    return _generate(
        config,
        params,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask),
        rng,
        spec=spec,
        activations=active_resolver(),
        fan_out=int(samples_per_prompt),
        compact=bool(compact),
        keep=bool(return_state),
        layer_scan=bool(layer_scan),
    )


def continue_generate(
    config: ModelConfig,
    params,
    state: DecodeState,
    append_ids: jax.Array,
    append_mask: jax.Array,
    rng: jax.Array,
    spec: SamplingSpec,
    *,
    return_state: bool = False,
) -> GenerateOutput:
    """Go on from where a `generate(..., return_state=True)` (or a continuation) stopped:
    `append_ids` [B, A] (mask `append_mask`, padding anywhere) follow each row's context
    (its prompt, its generated tokens up to its EOS), then `spec.max_new_tokens` new ones.

    The same tokens as `generate` over the whole context as one prompt (the cache layout is
    the same; only float rounding differs, a prefill against decode steps); the cache grows
    by A + N slots (one copy of it). A row should append at least one real token, or its
    last generated token must be real: it continues from its last real token.
    """
    return _continue(
        config,
        params,
        state,
        jnp.asarray(append_ids, jnp.int32),
        jnp.asarray(append_mask).astype(jnp.int32),
        rng,
        spec=spec,
        activations=active_resolver(),
        keep=bool(return_state),
    )
