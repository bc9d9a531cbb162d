"""A random `Experience` around given token ids and masks, for tests of the RL update."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.steps import Experience


def experience_from_masks(algo, rng, seq_ids, seq_mask, response_ids, mask) -> Experience:
    """Every per-token array drawn from `rng` (normal, zero where `mask` is): log-probs near
    -2, the reference's near them when the algorithm reads one, values and returns when it
    trains a critic; rows grouped in pairs."""
    b, n = mask.shape

    def per_token(scale=1.0, shift=0.0):
        return jnp.asarray((rng.normal(size=(b, n)) * scale + shift) * mask, jnp.float32)

    logprobs = per_token(0.3, -2.0)
    return Experience(
        sequence_ids=jnp.asarray(seq_ids, jnp.int32),
        sequence_mask=jnp.asarray(seq_mask),
        response_ids=jnp.asarray(response_ids, jnp.int32),
        response_mask=jnp.asarray(mask),
        logprobs=logprobs,
        ref_logprobs=logprobs + per_token(0.1) if algo.uses_reference else None,
        values=per_token() if algo.needs_critic else None,
        rewards=per_token(),
        advantages=per_token(),
        returns=per_token() if algo.needs_critic else None,
        scores=jnp.asarray(rng.normal(size=b), jnp.float32),
        kl=per_token(0.1) if algo.uses_reference else None,
        group_ids=jnp.arange(b, dtype=jnp.int32) // 2,
    )
