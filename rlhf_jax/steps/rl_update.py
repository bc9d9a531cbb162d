"""The RL update: epochs x minibatches as nested scans over one rollout batch.

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

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.config import PPOConfig
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.metrics import merged_metrics
from rlhf_jax.models import ModelConfig
from rlhf_jax.ops import (
    adaptive_kl_update,
    kl_estimate,
    masked_mean,
    reduce_tokens,
)
from rlhf_jax.steps.algorithm import RLAlgorithm
from rlhf_jax.steps.experience import (
    Experience,
    advantage_batch,
    response_logprobs,
    response_values,
)
from rlhf_jax.steps.rl_state import Frozen, RLState, policy_with
from rlhf_jax.steps.sft import lm_outputs
from rlhf_jax.steps.state import accumulate_gradients, skip_metrics
from rlhf_jax.types import LossOut

# Metrics taken from the first minibatch of the first epoch (before any update), not averaged.
FIRST_MINIBATCH = ("rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_max")


def loss_batch(mb: dict, scalars: dict) -> dict:
    """The minibatch under the names losses read (old_logprobs, old_values, ...)."""
    out = {
        "old_logprobs": mb["logprobs"],
        "advantages": mb["advantages"],
        "response_mask": mb["response_mask"],
        "group_ids": mb["group_ids"],
        "scores": mb["scores"],
        "rewards": mb["rewards"],
        **scalars,
    }
    if "ref_logprobs" in mb:
        out["ref_logprobs"] = mb["ref_logprobs"]
    if "values" in mb:
        out["old_values"], out["returns"] = mb["values"], mb["returns"]
    return out


def make_update_fn(
    policy_cfg: ModelConfig,
    critic_cfg: ModelConfig | None,
    ppo: PPOConfig,
    algo: RLAlgorithm,
    ptx_loss_fn: Callable[..., LossOut] | None = None,
    ptx_coef: float = 0.0,
    grad_accum: int = 1,
) -> Callable:
    """`update(state, exp, ptx_batch, key, frozen=None) -> (state, metrics)`.

    ptx_batch: `input_ids`, `attention_mask` of shape [epochs, n_minibatches, ptx_bs, L]
    (one pretraining batch per minibatch), or None when ptx is off. frozen: RL's `Frozen`
    weights, needed for a LoRA policy (`policy_cfg.lora_rank`: its base is `frozen.ref`).
    """
    use_ptx = ptx_loss_fn is not None and ptx_coef > 0
    kl_in_loss = algo.kl_penalty == "loss"

    def minibatch_loss(params, mb, scalars, ptx_counts):
        policy_params, critic_params = params
        mask = mb["response_mask"]
        # Over the support the rollout recorded (with top-k / top-p), not this policy's own
        # top-k: a sampled token stays in it whatever the update does to the weights. With a
        # shared trunk, the values come from the same forward.
        logp, entropy, values = response_logprobs(
            policy_cfg, policy_params, mb["sequence_ids"], mb["sequence_mask"],
            mb["response_ids"], ppo.temperature, mb.get("support"), values=algo.shared_critic,
        )  # fmt: skip
        batch = loss_batch(mb, scalars)
        pol = algo.policy_loss({"logprobs": logp, "entropy": entropy}, batch)
        total = pol.loss
        library: dict = {}  # what the update writes itself, next to the parts' metrics
        sources = [("the policy loss (ppo.policy_loss)", pol.metrics)]
        # The trainer recomputes what the sampler computed: on the first minibatch (weights
        # still those that sampled) the two must agree to float rounding.
        gap = jnp.where(mask != 0, jnp.abs(logp - mb["logprobs"]), 0.0)
        library["rollout/logprob_mismatch_mean"] = masked_mean(
            gap, mask, count=scalars["token_count"]
        )
        library["rollout/logprob_mismatch_max"] = jnp.max(gap)
        if kl_in_loss:
            kl = kl_estimate(logp, mb["ref_logprobs"], algo.kl_estimator, mask)
            kl_loss = reduce_tokens(
                kl, mask, algo.reduction, scalars["token_count"], scalars["sequence_count"]
            )
            total = total + scalars["beta"] * kl_loss
            library["ppo/kl_loss"] = kl_loss
        if algo.needs_critic:
            if values is None:
                p = mb["sequence_ids"].shape[1] - mb["response_ids"].shape[1]
                values = response_values(
                    critic_cfg, critic_params, mb["sequence_ids"], mb["sequence_mask"], p
                )
            val = algo.value_loss({"values": values}, batch)
            total = total + ppo.vf_coef * val.loss
            sources.append(("the value loss (ppo.value_loss)", val.metrics))
        if use_ptx:
            ptx_batch = {"input_ids": mb["ptx_input_ids"], "attention_mask": mb["ptx_mask"]}
            ptx_batch.update(ptx_counts)
            ptx_outputs = lm_outputs(
                policy_cfg, policy_params, ptx_batch["input_ids"], ptx_batch["attention_mask"]
            )
            ptx = ptx_loss_fn(ptx_outputs, ptx_batch)
            total = total + ptx_coef * ptx.loss
            sources.append(("the pretraining loss (ptx.loss)", ptx.metrics))
        library["ppo/loss/total"] = total
        return total, merged_metrics(*sources, ("the RL update itself", library))

    def train_minibatch(state: RLState, mb: dict, frozen: Frozen | None):
        critic = state.critic
        params = (state.policy.params, critic.params if critic is not None else None)
        # The whole minibatch's normalisers, computed before it is split into micro-batches
        # (`losses.accumulation`); the micro-batches' losses and gradients are then summed.
        whole_mb = loss_batch(mb, {})
        scalars = {
            **batch_counts("policy", algo.policy_loss, whole_mb),
            **(batch_counts("value", algo.value_loss, whole_mb) if algo.needs_critic else {}),
            "beta": state.beta,
            "iteration": state.iteration,
        }
        ptx_counts = {}
        if use_ptx:
            ptx_whole = {"input_ids": mb["ptx_input_ids"], "attention_mask": mb["ptx_mask"]}
            ptx_counts = batch_counts("ptx", ptx_loss_fn, ptx_whole)

        def loss_of_trained(trained, mb):  # gradients for the trained weights only
            policy_trained, critic_trained = trained
            whole = (
                policy_with(policy_cfg, policy_trained, frozen),
                critic.with_trained(critic_trained) if critic is not None else None,
            )
            return minibatch_loss(whole, mb, scalars, ptx_counts)

        _, grads, metrics = accumulate_gradients(loss_of_trained, params, mb, grad_accum)
        policy = state.policy.apply_gradients(grads[0])
        if critic is not None:
            critic = critic.apply_gradients(grads[1])
        ema = state.ema_params
        if ema is not None:
            d = ppo.ema_decay
            ema = jax.tree.map(lambda e, w: d * e + (1 - d) * w, ema, policy.params)
        return state.replace(policy=policy, critic=critic, ema_params=ema), metrics

    def update(
        state: RLState,
        exp: Experience,
        ptx_batch: dict | None,
        key: jax.Array,
        frozen: Frozen | None = None,
    ):
        b = exp.response_ids.shape[0]
        n_mb = b // ppo.minibatch_size
        fields = {k: v for k, v in exp._asdict().items() if v is not None}

        def epoch(state, xs):
            epoch_key, ptx_epoch = xs
            order = jax.random.permutation(epoch_key, b).reshape(n_mb, ppo.minibatch_size)

            def one(state, ys):
                idx, ptx_mb = ys
                mb = {k: v[idx] for k, v in fields.items()}
                if use_ptx:
                    mb["ptx_input_ids"] = ptx_mb["input_ids"]
                    mb["ptx_mask"] = ptx_mb["attention_mask"]
                return train_minibatch(state, mb, frozen)

            return jax.lax.scan(one, state, (order, ptx_epoch))

        keys = jax.random.split(key, ppo.epochs)
        ptx_xs = ptx_batch if use_ptx else None
        state, metrics = jax.lax.scan(epoch, state, (keys, ptx_xs))
        metrics = {k: v[0, 0] if k in FIRST_MINIBATCH else jnp.mean(v) for k, v in metrics.items()}
        beta = state.beta
        if ppo.adaptive_kl:
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
        advantage_state = algo.advantage(batch).state
        return state.replace(
            beta=beta, iteration=state.iteration + 1, advantage_state=advantage_state
        ), metrics

    return update
