"""Compiled rollout: sampling and generation (experience making comes with the PPO stage)."""

from rlhf_jax.rollout.generate import GenerateOutput, SamplingSpec, generate
from rlhf_jax.rollout.sampling import filter_logits, sample_token, sampling_log_probs

__all__ = [
    "GenerateOutput",
    "SamplingSpec",
    "filter_logits",
    "generate",
    "sample_token",
    "sampling_log_probs",
]
