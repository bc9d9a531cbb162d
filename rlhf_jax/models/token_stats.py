"""Log-probs and entropies of tokens from hidden states: through the whole logits, or chunk by
chunk (`ops.chunked_token_stats`) when they would be large.

`ModelConfig.logits_chunk` chooses: 0 = always the dense path (`lm_logits` then
`ops.policy_token_logprobs`, what every call did before the switch existed); N = chunks of
about N tokens (every row of the batch in each chunk, `max(1, N // rows)` positions); None =
automatic: dense while one call's float32 logits stay under `AUTO_MIN_LOGITS_BYTES`, else
chunks of about `AUTO_CHUNK_BYTES` of logits. Below the threshold the two paths differ by
float rounding only, but the dense one is what small runs (the quickstart) have always
computed, so it stays theirs bit for bit; above it the chunked one saves the logits (16 GiB
for 32 rows x 1k tokens at a 128k vocabulary) for one more head matmul in the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import lm_logits
from rlhf_jax.ops import policy_token_logprobs
from rlhf_jax.ops.chunked_logprobs import TokenStats, chunked_token_stats

AUTO_MIN_LOGITS_BYTES = 1 << 30  # the automatic switch chunks calls whose logits reach this
AUTO_CHUNK_BYTES = 128 << 20  # ... into chunks of about this much float32 logits


def logits_chunk(config: ModelConfig, rows: int, positions: int) -> int:
    """Positions per chunk for log-probs over `rows` x `positions` tokens; 0 = dense."""
    per_position = rows * config.vocab_size * 4
    setting = config.logits_chunk
    if setting is None:
        if per_position * positions < AUTO_MIN_LOGITS_BYTES:
            return 0
        return max(1, AUTO_CHUNK_BYTES // per_position)
    return max(1, setting // rows) if setting else 0


def head_weight(config: ModelConfig, params) -> jax.Array:
    """The LM head [D, V] (the embedding's transpose when tied), as `lm_logits` applies it."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def token_logprobs_from_hidden(
    config: ModelConfig,
    params,
    h_BTD: jax.Array,
    tokens_BT: jax.Array,
    temperature: float = 1.0,
    support_BTW: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`(log-probs, entropies)` [B, T] of `tokens_BT` scored by the logits of `h_BTD`
    (`ops.policy_token_logprobs`' conventions: temperature, the recorded support)."""
    chunk = logits_chunk(config, *tokens_BT.shape)
    if not chunk:
        logits_BTV = lm_logits(config, params, h_BTD)
        return policy_token_logprobs(logits_BTV, tokens_BT, temperature, support_BTW=support_BTW)
    s = chunked_token_stats(
        h_BTD, head_weight(config, params), tokens_BT, chunk, temperature,
        support_BTW=support_BTW, compute_dtype=config.compute_dtype,
    )  # fmt: skip
    return s.logprobs, s.entropy


def next_token_stats(config: ModelConfig, params, h_BTD: jax.Array, input_ids_BT: jax.Array):
    """`TokenStats` [B, T - 1] of a causal LM, chunked: entry t scores `input_ids[t + 1]`
    (log-prob at temperature 1, entropy, and the argmax of the logits at t). For the
    chunked path only (`logits_chunk(...) > 0`); the dense one keeps the logits."""
    b, t = input_ids_BT.shape
    # Each position scores the next token, the last one a dummy (dropped), so the hidden
    # states are never sliced (their gradient would be padded back by a copy).
    targets_BT = jnp.concatenate([input_ids_BT[:, 1:], input_ids_BT[:, :1]], axis=1)
    s = chunked_token_stats(
        h_BTD, head_weight(config, params), targets_BT, logits_chunk(config, b, t),
        compute_dtype=config.compute_dtype,
    )  # fmt: skip
    return TokenStats(*(x[:, :-1] for x in s))
