"""Pure step functions: `make_*` factories close over configs and return
`step(state, batch, key) -> (state, metrics)` for the loops to jit with shardings.

RL is assembled from parts (`RLAlgorithm`): `make_experience_fn` (or `make_sample_fn` +
`make_finish_fn` around a host reward function) and `make_update_fn`.
"""

from rlhf_jax.steps.algorithm import RLAlgorithm, check_reward_fns, resolve_config_parts
from rlhf_jax.steps.experience import (
    Experience,
    Rollout,
    make_experience_fn,
    make_finish_fn,
    make_sample_fn,
    response_logits,
    response_values,
)
from rlhf_jax.steps.optim import make_optimizer, make_schedule
from rlhf_jax.steps.preference import completion_logps, make_logps_fn, make_preference_step
from rlhf_jax.steps.reward import (
    completion_rewards,
    make_reward_step,
    normalize_reward_bias,
    score_sequences,
)
from rlhf_jax.steps.rl_state import (
    Frozen,
    RLState,
    init_rl_state,
    policy_weights,
    policy_with,
)
from rlhf_jax.steps.rl_update import make_update_fn
from rlhf_jax.steps.sft import make_sft_step
from rlhf_jax.steps.state import TrainState, accumulate_gradients

__all__ = [
    "Experience",
    "Frozen",
    "RLAlgorithm",
    "RLState",
    "Rollout",
    "TrainState",
    "accumulate_gradients",
    "check_reward_fns",
    "completion_logps",
    "completion_rewards",
    "init_rl_state",
    "policy_weights",
    "policy_with",
    "make_experience_fn",
    "make_finish_fn",
    "make_logps_fn",
    "make_optimizer",
    "make_preference_step",
    "make_reward_step",
    "make_sample_fn",
    "make_schedule",
    "make_sft_step",
    "make_update_fn",
    "normalize_reward_bias",
    "resolve_config_parts",
    "response_logits",
    "response_values",
    "score_sequences",
]
