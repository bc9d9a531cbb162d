"""Pure math of RLHF: masked reductions, log-probs, GAE, KL estimators and controller, stats.

No models, no config objects; every function is pure and jittable.
"""

from rlhf_jax.ops.gae import gae_advantages
from rlhf_jax.ops.kl import (
    KL_ESTIMATORS,
    AdaptiveKLState,
    adaptive_kl_update,
    kl_estimate,
    last_token_onehot,
    per_token_rewards,
)
from rlhf_jax.ops.logprobs import entropy_from_logits, next_token_logprobs, token_logprobs
from rlhf_jax.ops.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.ops.stats import explained_variance

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLState",
    "adaptive_kl_update",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "kl_estimate",
    "last_token_onehot",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_logprobs",
    "per_token_rewards",
    "token_logprobs",
]
