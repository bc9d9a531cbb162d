"""Compiled rollout: sampling and generation (experience making comes with the PPO stage)."""

from rlhf_jax.rollout.generate import (
    DecodeState,
    GenerateOutput,
    SamplingSpec,
    continue_generate,
    generate,
)
from rlhf_jax.rollout.sampling import filter_logits, sample_token, sampling_log_probs

__all__ = [
    "DecodeState",
    "GenerateOutput",
    "SamplingSpec",
    "continue_generate",
    "filter_logits",
    "generate",
    "sample_token",
    "sampling_log_probs",
]
