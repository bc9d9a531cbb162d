"""Compiled generation: prefill the prompt into a preallocated KV cache, then decode inside one
`lax.while_loop`. One compile per (shape, sampling settings); no Python per token.

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
    forward_cached,
    init_cache,
    positions_from_mask,
    split_layers,
)
from rlhf_jax.ops.logprobs import support_width, truncates
from rlhf_jax.rollout.sampling import sample_token_and_support


class GenerateOutput(NamedTuple):
    """Generated continuation of each prompt; N = max_new_tokens.

    tokens:   [B, N] int32, `pad_id` after a row's first EOS.
    logprobs: [B, N] float32, log-prob of each token under the sampling distribution, 0 on padding.
    mask:     [B, N] float32, 1 for generated tokens up to and including the first EOS.
    support:  [B, N, ceil(V / 32)] uint32, the tokens each one was drawn from, packed
              (`ops.pack_support`; all zero on padding); only with `record_support` and a
              top-k / top-p that truncates, else None.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    support: jax.Array | None = None


class _DecodeState(NamedTuple):
    step: jax.Array  # scalar int32: index of the token being chosen
    cache: KVCache
    kv_mask_BS: jax.Array
    logits_BV: jax.Array  # next-token logits
    position_B: jax.Array  # position of the token being chosen
    done_B: jax.Array
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    mask_BN: jax.Array
    support_BNW: jax.Array | None


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


class _Decoder(NamedTuple):
    """What every decode step reads and never changes."""

    config: ModelConfig
    params: dict  # per-layer weights (`split_layers`)
    rng: jax.Array
    spec: SamplingSpec
    eos_arr: jax.Array  # [E] int32 the EOS ids ([-1] for none)
    prompt_len: int


@functools.partial(jax.jit, static_argnames=("config", "spec", "activations"))
def _generate(
    config, params, prompt_ids_BP, prompt_mask_BP, rng, *, spec: SamplingSpec, activations
) -> GenerateOutput:
    del activations  # only a cache key: the model reads the same resolver while tracing
    b, p = prompt_ids_BP.shape
    n = spec.max_new_tokens
    prompt_mask_BP = prompt_mask_BP.astype(jnp.int32)
    config, params = _decode_weights(config, params)
    # The last generated token is never fed back, so the cache needs P + N - 1 slots.
    cache = init_cache(config, b, p + n - 1)
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
    eos_arr = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)
    v = logits_B1V.shape[-1]
    support_BNW = None
    if spec.record_support and spec.temperature != 0 and truncates(spec.top_k, spec.top_p, v):
        support_BNW = jnp.zeros((b, n, support_width(v)), jnp.uint32)
    dec = _Decoder(config, params, rng, spec, eos_arr, p)
    init = _DecodeState(
        step=jnp.int32(0),
        cache=cache,
        kv_mask_BS=kv_mask_BS,
        logits_BV=logits_B1V[:, 0],
        position_B=jnp.sum(prompt_mask_BP, axis=-1),
        done_B=jnp.zeros((b,), bool),
        tokens_BN=jnp.full((b, n), spec.pad_id, jnp.int32),
        logprobs_BN=jnp.zeros((b, n), jnp.float32),
        mask_BN=jnp.zeros((b, n), jnp.float32),
        support_BNW=support_BNW,
    )
    final = jax.lax.while_loop(
        functools.partial(_more, n), functools.partial(_decode_step, dec), init
    )
    # Token N - 1 (or, after an early exit, the next one: every row is done, so it writes
    # padding with mask 0, exactly what the loop would have written).
    _, _, tokens_BN, logprobs_BN, mask_BN, support_BNW = _choose(dec, final)
    return GenerateOutput(tokens_BN, logprobs_BN, mask_BN, support_BNW)


def _decode_weights(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """The weights as every decode step reads them: per-layer slices, made once here, not
    inside every step; a tied LM head as its own [D, V] copy, made once per call: read as
    `embed.T` inside the loop, the head's GEMM ran on the transposed [V, D] operand, slower
    on XLA:CPU (decode step at vocab 50257, batch 8: 9.0-9.1 -> 7.5-8.2 ms; within noise at
    8192)."""
    params = split_layers(params)
    if config.tie_embeddings:
        params = {**params, "lm_head": params["embed"].T}
        config = dataclasses.replace(config, tie_embeddings=False)
    return config, params


def _choose(dec: _Decoder, s: _DecodeState) -> tuple:
    """Pick token `s.step` from the current logits and record it."""
    spec = dec.spec
    token_B, logp_B, support_BW = sample_token_and_support(
        s.logits_BV, jax.random.fold_in(dec.rng, s.step), spec.temperature, spec.top_k, spec.top_p
    )
    alive_B = ~s.done_B
    token_B = jnp.where(alive_B, token_B, spec.pad_id)
    col = (0, s.step)
    tokens_BN = jax.lax.dynamic_update_slice(s.tokens_BN, token_B[:, None], col)
    logprobs_BN = jax.lax.dynamic_update_slice(
        s.logprobs_BN, jnp.where(alive_B, logp_B, 0.0)[:, None], col
    )
    mask_BN = jax.lax.dynamic_update_slice(s.mask_BN, alive_B.astype(jnp.float32)[:, None], col)
    support_BNW = s.support_BNW
    if support_BNW is not None:
        support_BW = jnp.where(alive_B[:, None], support_BW, jnp.uint32(0))
        support_BNW = jax.lax.dynamic_update_slice(support_BNW, support_BW[:, None], (0, s.step, 0))
    done_B = s.done_B | (alive_B & jnp.isin(token_B, dec.eos_arr))
    return token_B, done_B, tokens_BN, logprobs_BN, mask_BN, support_BNW


def _more(n: int, s: _DecodeState) -> jax.Array:
    """Whether the loop goes on. The last token is chosen after the loop: it needs no
    forward pass of its own."""
    return (s.step < n - 1) & ~jnp.all(s.done_B)


def _decode_step(dec: _Decoder, s: _DecodeState) -> _DecodeState:
    """Choose token `s.step`, then feed it through the model for the next logits."""
    token_B, done_B, tokens_BN, logprobs_BN, mask_BN, support_BNW = _choose(dec, s)
    b = token_B.shape[0]
    slot = dec.prompt_len + s.step
    kv_mask_BS = jax.lax.dynamic_update_slice(s.kv_mask_BS, jnp.ones((b, 1), jnp.int32), (0, slot))
    logits_B1V, cache = forward_cached(
        dec.config, dec.params, token_B[:, None], s.position_B[:, None], s.cache, kv_mask_BS, slot
    )
    return _DecodeState(
        s.step + 1,
        cache,
        kv_mask_BS,
        logits_B1V[:, 0],
        s.position_B + 1,
        done_B,
        tokens_BN,
        logprobs_BN,
        mask_BN,
        support_BNW,
    )


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
) -> GenerateOutput:
    """Sample up to `max_new_tokens` tokens after each prompt.

    Args:
      prompt_ids, prompt_mask: [B, P] padded prompts (left padding is usual; any works).
      rng: a JAX PRNG key; each step uses `fold_in(rng, step)`.
      temperature: 0 means greedy (argmax).
      top_k, top_p: optional truncation of the sampling distribution.
      eos_id: one id or several; a row stops after emitting one (it is kept, mask 1).
        None: never stop early.
      pad_id: token written after a row stops (default: the first EOS id, else 0).
      record_support: also return the set of tokens each one was drawn from (`support`),
        which RL needs to take every log-prob over the sampling distribution's support.
      spec: all of the above as one `SamplingSpec` instead (then give none of them).
    """
    if spec is None:
        if max_new_tokens is None:
            raise ValueError("generate needs max_new_tokens (or a SamplingSpec)")
        spec = SamplingSpec.of(
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            pad_id=pad_id,
            record_support=record_support,
        )
    elif max_new_tokens is not None:
        raise ValueError("generate takes max_new_tokens or a SamplingSpec, not both")
    return _generate(
        config,
        params,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_mask),
        rng,
        spec=spec,
        activations=active_resolver(),
    )
