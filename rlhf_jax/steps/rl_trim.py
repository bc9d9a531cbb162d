"""The RL update on the experience cut to its real columns (`ppo.trim_update`).

The sampler writes every response to `ppo.max_new_tokens` and every prompt to
`ppo.max_prompt_len` (left-padded), so an update over the whole experience computes, in its
forwards and backwards, the columns after the iteration's longest response and the columns
before its longest prompt, which no loss reads. With the switch, the host reads the
iteration's real extent (two scalars, one device-to-host read) and the update runs on the
experience cut to it:

  responses  columns [0, n), n = the last response column any row uses, rounded up
  prompts    columns [P - p, P), p = the longest prompt, rounded up (padding is on the left)

each rounded up to a power of two (at most the configured length), so a run compiles at most
log2(max_prompt_len) x log2(max_new_tokens) update programs, and in practice a few.

Why it is exact: a real token's hidden state depends on itself and the real tokens before it
(causal attention; padding is masked out of the keys and positions count real tokens only), so
columns after the last real response token and before the first real prompt token change no
real token's log-prob, value or entropy; every loss reads per-token terms through the response
mask. The one exception is a reduction that divides by the padded length itself
(`seq_mean_token_sum_norm`, Dr. GRPO's constant): trimming would change that constant every
iteration, so `RLAlgorithm.from_config` refuses the pair. A fork's loss that reads
`response_mask.shape[1]` sees the trimmed length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.steps.experience import Experience

__all__ = ["bucket", "real_extent", "trim_experience", "trimmed_lengths"]

# The experience fields that hold the whole sequence (prompt + response); every other field of
# rank >= 2 is per response token ([B, N, ...]).
SEQUENCE_FIELDS = ("sequence_ids", "sequence_mask")


def bucket(n: int, limit: int, per_doubling: int = 1) -> int:
    """`n` rounded up to its bucket, at least 1 and at most `limit`. The buckets: the powers
    of two and, with `per_doubling` = 2, 4 or 8, that many equal steps from each to the next
    (2: 4, 6, 8, 12, 16, ...), so a bucket wastes less than 1 / (1 + per_doubling) of itself
    (from the second doubling on) and every bucket of 2^k or more is a multiple of
    2^k / per_doubling (shapes that tile)."""
    if n >= limit:
        return limit
    n = max(n, 1)
    step = max((1 << (n.bit_length() - 1)) // per_doubling, 1)
    return min(limit, -(-n // step) * step)


def real_extent(exp: Experience) -> jax.Array:
    """int32 [2]: (the longest prompt, the responses' used columns) of `exp`: the prompt
    columns from the first one any row has a real token in to the prompt's end, and the
    response columns up to the last one any row has a real token in. Run on device; the host
    reads the two numbers."""
    n = exp.response_ids.shape[1]
    p = exp.sequence_ids.shape[1] - n
    prompt_any = jnp.any(exp.sequence_mask[:, :p] != 0, axis=0)
    response_any = jnp.any(exp.response_mask != 0, axis=0)
    first_real = jnp.where(jnp.any(prompt_any), jnp.argmax(prompt_any), p)
    last_from_end = jnp.argmax(response_any[::-1])
    used = jnp.where(jnp.any(response_any), n - last_from_end, 0)
    return jnp.stack([p - first_real, used]).astype(jnp.int32)


def trimmed_lengths(
    extent: tuple[int, int], prompt_len: int, response_len: int, per_doubling: int = 1
):
    """`(prompt columns, response columns)` the update runs on: the real extent rounded up to
    its bucket (`bucket`), at least one column of each (the first response token is
    predicted from the prompt's last column)."""
    p, n = extent
    return bucket(p, prompt_len, per_doubling), bucket(n, response_len, per_doubling)


def trim_experience(exp: Experience, prompt_cols: int, response_cols: int) -> Experience:
    """`exp` with its sequences cut to the last `prompt_cols` prompt columns and the first
    `response_cols` response columns, and every per-token field to those response columns
    (jit it with the two lengths static; only the second axis is cut, rows stay where they
    are)."""
    n = exp.response_ids.shape[1]
    p = exp.sequence_ids.shape[1] - n
    out = {}
    for name, x in exp._asdict().items():
        if x is None or x.ndim < 2:
            out[name] = x
        elif name in SEQUENCE_FIELDS:
            out[name] = x[:, p - prompt_cols : p + response_cols]
        else:
            out[name] = x[:, :response_cols]
    return Experience(**out)
