"""Pure step functions: `make_*` factories close over configs and return
`step(state, batch, key) -> (state, metrics)` for the loops to jit with shardings."""

from rlhf_jax.steps.optim import make_optimizer, make_schedule
from rlhf_jax.steps.ppo import (
    Experience,
    Frozen,
    PPOState,
    init_ppo_state,
    make_experience_fn,
    make_update_fn,
)
from rlhf_jax.steps.reward import (
    completion_rewards,
    make_reward_eval,
    make_reward_step,
    normalize_reward_bias,
    score_sequences,
)
from rlhf_jax.steps.sft import make_sft_eval, make_sft_step
from rlhf_jax.steps.state import TrainState, accumulate_gradients

__all__ = [
    "Experience",
    "Frozen",
    "PPOState",
    "TrainState",
    "accumulate_gradients",
    "completion_rewards",
    "init_ppo_state",
    "make_experience_fn",
    "make_optimizer",
    "make_reward_eval",
    "make_reward_step",
    "make_schedule",
    "make_sft_eval",
    "make_sft_step",
    "make_update_fn",
    "normalize_reward_bias",
    "score_sequences",
]
