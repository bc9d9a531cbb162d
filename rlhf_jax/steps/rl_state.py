"""What RL training changes and what it only reads: the policy (and, for estimators that need
one, a critic) with their optimizers, the KL coefficient, the EMA weights; the frozen reference
policy and reward model."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax import registry
from rlhf_jax.config import PPOConfig
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.lora import merge_trees
from rlhf_jax.steps.state import TrainState


class RLState(struct.PyTreeNode):
    """Everything RL changes. `critic` is None when the advantage estimator needs no critic:
    then no value weights, optimizer moments or checkpoint entries exist at all."""

    policy: TrainState
    critic: TrainState | None
    beta: jax.Array  # KL coefficient; adapted in compiled code when ppo.adaptive_kl
    ema_params: Any  # EMA of the policy weights (InstructGPT: 0.992), or None
    iteration: jax.Array
    # The advantage estimator's own state, for one that declares `state` (rlhf_jax.advantages)
    advantage_state: Any = None


class Frozen(NamedTuple):
    """Weights RL reads but never changes; each is None when the run does not use it."""

    # The SFT policy: the KL's reference and, with a LoRA policy, the base its adapters sit
    # on (one copy for both). None when ppo.kl_penalty is none and the policy trains in full.
    ref: Any
    reward: Any  # the reward model {"trunk", "head"} (None when ppo.reward_fn scores)


def policy_weights(policy_cfg: ModelConfig, state: RLState, frozen: Frozen | None):
    """The policy's whole weights: its own, or for a LoRA policy (`policy_cfg.lora_rank`)
    its adapters joined with the frozen SFT base `frozen.ref`."""
    return policy_with(policy_cfg, state.policy.params, frozen)


def policy_with(policy_cfg: ModelConfig, trained, frozen: Frozen | None):
    """`trained` (the policy's trained weights, or their EMA) as whole weights."""
    if not policy_cfg.lora_rank:
        return trained
    return merge_trees(frozen.ref, trained)


def init_rl_state(
    policy_params: Any,
    critic_params: Any,
    policy_tx: optax.GradientTransformation,
    critic_tx: optax.GradientTransformation | None,
    ppo: PPOConfig,
    critic_frozen: Any = None,
) -> RLState:
    """Fresh buffers for everything RL updates: the update donates its state, and the SFT (and
    RM) weights these start from must survive as the frozen reference (and reward model).
    `critic_params` None: no critic. For LoRA, `policy_params` are the policy's adapters (its
    base is `Frozen.ref`), and `critic_frozen` the critic's base trunk."""

    def copy(tree):
        return jax.tree.map(lambda x: jax.device_put(x, may_alias=False), tree)

    critic = None
    if critic_params is not None:
        critic = TrainState.create(copy(critic_params), critic_tx, frozen=copy(critic_frozen))
    return RLState(
        policy=TrainState.create(copy(policy_params), policy_tx),
        critic=critic,
        beta=jnp.asarray(ppo.beta, jnp.float32),
        ema_params=copy(policy_params) if ppo.ema_decay > 0 else None,
        iteration=jnp.zeros((), jnp.int32),
        advantage_state=initial_advantage_state(ppo),
    )


def initial_advantage_state(ppo: PPOConfig) -> Any:
    """The initial state `ppo.advantage` declares (`state=`), or None for a stateless one."""
    init = registry.info(registry.lookup("advantage", ppo.advantage)).get("state")
    return None if init is None else init()
