"""The RL update: epochs x minibatches as nested scans over one rollout batch, as module-level
functions (`update` -> `train_epoch` -> `minibatch_step` -> `train_minibatch`, then
`end_iteration`; the loss is `steps/rl_loss.py`), each reading the run's `UpdateConfig`.

Each minibatch is one optimizer update of the policy (and of the critic, when there is one):
loss = policy loss (+ beta * KL when `ppo.kl_penalty=loss`) (+ vf_coef * critic loss)
(+ ptx_coef * pretraining loss), accumulated into ONE gradient (as InstructGPT's PPO-ptx, not a
separate optimizer step). Every term of a micro-batch (`policy_optim.grad_accum`) is
normalised by the whole minibatch's counts (`losses.accumulation`; the ptx term by its own
batch's), so the sum over micro-batches is exactly the minibatch's loss, gradient and metrics
even when they hold different numbers of tokens. The KL controller then updates beta in
compiled code.

Every loss sees the whole minibatch: the batch keys of `contract.POLICY_KEYS` (plus
`ref_logprobs` with a KL term, `old_values` and `returns` with a critic), and the dynamic
values `beta` and `iteration`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.config import PPOConfig
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.metrics import merged_metrics
from rlhf_jax.models import ModelConfig
from rlhf_jax.ops import adaptive_kl_update
from rlhf_jax.steps.algorithm import RLAlgorithm
from rlhf_jax.steps.experience import Experience, advantage_batch
from rlhf_jax.steps.rl_inputs import (
    EpochInputs,
    MinibatchInputs,
    Normalisers,
    UpdateConfig,
    uses_ptx,
)
from rlhf_jax.steps.rl_loss import loss_batch, minibatch_loss
from rlhf_jax.steps.rl_pack import PackLayout
from rlhf_jax.steps.rl_state import Frozen, RLState, policy_with
from rlhf_jax.steps.state import accumulate_gradients, skip_metrics
from rlhf_jax.types import LossOut

__all__ = [
    "FIRST_MINIBATCH",
    "UpdateConfig",
    "end_iteration",
    "loss_batch",
    "make_update_fn",
    "minibatch_step",
    "normalisers",
    "train_epoch",
    "train_minibatch",
    "update",
    "uses_ptx",
]

# Metrics taken from the first minibatch of the first epoch (before any update), not averaged.
FIRST_MINIBATCH = ("rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_max")


def make_update_fn(
    policy_cfg: ModelConfig,
    critic_cfg: ModelConfig | None,
    ppo: PPOConfig,
    algo: RLAlgorithm,
    ptx_loss_fn: Callable[..., LossOut] | None = None,
    ptx_coef: float = 0.0,
    grad_accum: int = 1,
    pack: PackLayout | None = None,
) -> Callable:
    """`update(state, exp, ptx_batch, key, frozen=None) -> (state, metrics)`: `update` with
    its `UpdateConfig` bound.

    ptx_batch: `input_ids`, `attention_mask` of shape [epochs, n_minibatches, ptx_bs, L]
    (one pretraining batch per minibatch), or None when ptx is off. frozen: RL's `Frozen`
    weights, needed for a LoRA policy (`policy_cfg.lora_rank`: its base is `frozen.ref`).
    pack: the trunk forwards on packed rows of this layout (`steps/rl_pack.py`), or padded.
    """
    cfg = UpdateConfig(policy_cfg, critic_cfg, ppo, algo, ptx_loss_fn, ptx_coef, grad_accum, pack)
    # A partial (its signature without `cfg`) named as the function it binds: jit names
    # its program after `__name__`, also through the wrappers of `sharding.jit`.
    bound = functools.partial(update, cfg)
    bound.__name__, bound.__doc__ = update.__name__, update.__doc__
    return bound


def update(
    cfg: UpdateConfig,
    state: RLState,
    exp: Experience,
    ptx_batch: dict | None,
    key: jax.Array,
    frozen: Frozen | None = None,
) -> tuple[RLState, dict]:
    """One RL iteration's optimizer updates: `ppo.epochs` shuffles of the experience, each
    cut into minibatches of `ppo.minibatch_size` rows; then `end_iteration`."""
    fields = {k: v for k, v in exp._asdict().items() if v is not None}
    keys = jax.random.split(key, cfg.ppo.epochs)
    xs = EpochInputs(keys, ptx_batch if cfg.use_ptx else None)
    epoch = functools.partial(train_epoch, cfg, fields, frozen)
    state, metrics = jax.lax.scan(epoch, state, xs)
    return end_iteration(cfg, state, exp, metrics)


def train_epoch(
    cfg: UpdateConfig, fields: dict, frozen: Frozen | None, state: RLState, xs: EpochInputs
) -> tuple[RLState, dict]:
    """One pass over the experience `fields` in a fresh random order."""
    b = fields["response_ids"].shape[0]
    size = cfg.ppo.minibatch_size
    order = jax.random.permutation(xs.key, b).reshape(b // size, size)
    step = functools.partial(minibatch_step, cfg, fields, frozen)
    return jax.lax.scan(step, state, MinibatchInputs(order, xs.ptx))


def minibatch_step(
    cfg: UpdateConfig, fields: dict, frozen: Frozen | None, state: RLState, xs: MinibatchInputs
) -> tuple[RLState, dict]:
    """The minibatch of rows `xs.rows` (and its ptx batch) gathered, then trained on."""
    mb = {k: v[xs.rows] for k, v in fields.items()}
    if cfg.use_ptx:
        mb["ptx_input_ids"] = xs.ptx["input_ids"]
        mb["ptx_mask"] = xs.ptx["attention_mask"]
    return train_minibatch(cfg, state, mb, frozen)


def normalisers(cfg: UpdateConfig, state: RLState, mb: dict) -> Normalisers:
    """The whole minibatch's normalisers, computed before it is split into micro-batches
    (`losses.accumulation`); the micro-batches' losses and gradients are then summed."""
    algo = cfg.algo
    whole_mb = loss_batch(mb, {})
    counts = {
        **batch_counts("policy", algo.policy_loss, whole_mb),
        **(batch_counts("value", algo.value_loss, whole_mb) if algo.needs_critic else {}),
    }
    ptx_counts = {}
    if cfg.use_ptx:
        ptx_whole = {"input_ids": mb["ptx_input_ids"], "attention_mask": mb["ptx_mask"]}
        ptx_counts = batch_counts("ptx", cfg.ptx_loss_fn, ptx_whole)
    return Normalisers(counts, state.beta, state.iteration, ptx_counts)


def trained_loss(
    cfg: UpdateConfig,
    state: RLState,
    frozen: Frozen | None,
    norm: Normalisers,
    trained: tuple,
    mb: dict,
) -> tuple[jax.Array, dict]:
    """`minibatch_loss` as a function of the trained weights only (what gets gradients): a
    LoRA policy's adapters joined with their frozen base, a critic's trained part with its
    frozen one."""
    policy_trained, critic_trained = trained
    critic = state.critic
    whole = (
        policy_with(cfg.policy_cfg, policy_trained, frozen),
        critic.with_trained(critic_trained) if critic is not None else None,
    )
    return minibatch_loss(cfg, whole, mb, norm)


def train_minibatch(
    cfg: UpdateConfig, state: RLState, mb: dict, frozen: Frozen | None
) -> tuple[RLState, dict]:
    """One optimizer update of the policy (and critic) on `mb`, over `cfg.grad_accum`
    micro-batches, and the policy's EMA moved on."""
    critic = state.critic
    params = (state.policy.params, critic.params if critic is not None else None)
    norm = normalisers(cfg, state, mb)
    loss_fn = functools.partial(trained_loss, cfg, state, frozen, norm)
    _, grads, metrics = accumulate_gradients(loss_fn, params, mb, cfg.grad_accum)
    policy = state.policy.apply_gradients(grads[0])
    if critic is not None:
        critic = critic.apply_gradients(grads[1])
    ema = state.ema_params
    if ema is not None:
        d = cfg.ppo.ema_decay
        ema = jax.tree.map(lambda e, w: d * e + (1 - d) * w, ema, policy.params)
    return state.replace(policy=policy, critic=critic, ema_params=ema), metrics


def end_iteration(
    cfg: UpdateConfig, state: RLState, exp: Experience, metrics: dict
) -> tuple[RLState, dict]:
    """After the last minibatch: the metrics reduced over epochs x minibatches, the KL
    controller's next beta, the iteration counted and the estimator's next state."""
    ppo = cfg.ppo
    metrics = {k: v[0, 0] if k in FIRST_MINIBATCH else jnp.mean(v) for k, v in metrics.items()}
    beta = state.beta
    if ppo.adaptive_kl:
        b = exp.response_ids.shape[0]
        mean_kl = jnp.mean(jnp.sum(exp.kl * exp.response_mask, axis=1))
        beta = adaptive_kl_update(beta, mean_kl, b, ppo.kl_target, ppo.kl_horizon)
    skips = skip_metrics(state.policy, "ppo/policy")
    if state.critic is not None:
        skips.update(skip_metrics(state.critic, "ppo/value"))
    metrics = merged_metrics(("the losses", metrics), ("the optimizer guard", skips))
    if state.advantage_state is None:
        return state.replace(beta=beta, iteration=state.iteration + 1), metrics
    # The estimator's next state, from the batch and state it made this experience with
    # (the experience program returns no state; the estimator is cheap next to a forward).
    batch = advantage_batch(
        exp.rewards, exp.response_mask, exp.scores, exp, exp.values, state.advantage_state
    )
    advantage_state = cfg.algo.advantage(batch).state
    return state.replace(
        beta=beta, iteration=state.iteration + 1, advantage_state=advantage_state
    ), metrics
