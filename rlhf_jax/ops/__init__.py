"""Pure math of RLHF: masked reductions, log-probs, GAE, KL estimators and controller, stats.

No models, no config objects; every function is pure and jittable.
"""

from rlhf_jax.ops.gae import discounted_returns, gae_advantages
from rlhf_jax.ops.groups import (
    group_mean,
    group_size,
    group_std,
    groups_all_equal,
    leave_one_out_mean,
)
from rlhf_jax.ops.kl import (
    KL_ESTIMATORS,
    AdaptiveKLState,
    adaptive_kl_update,
    kl_estimate,
    last_token_onehot,
    per_token_rewards,
)
from rlhf_jax.ops.logprobs import (
    entropy_from_logits,
    filter_logits,
    kept_tokens,
    next_token_logprobs,
    pack_support,
    policy_token_logprobs,
    token_logprobs,
    truncates,
    unpack_support,
)
from rlhf_jax.ops.masked import (
    REDUCTIONS,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reduce_tokens,
)
from rlhf_jax.ops.stats import explained_variance

__all__ = [
    "KL_ESTIMATORS",
    "REDUCTIONS",
    "adaptive_kl_update",
    "AdaptiveKLState",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "filter_logits",
    "gae_advantages",
    "group_mean",
    "group_size",
    "group_std",
    "groups_all_equal",
    "kept_tokens",
    "kl_estimate",
    "last_token_onehot",
    "leave_one_out_mean",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "next_token_logprobs",
    "pack_support",
    "per_token_rewards",
    "policy_token_logprobs",
    "reduce_tokens",
    "token_logprobs",
    "truncates",
    "unpack_support",
]
