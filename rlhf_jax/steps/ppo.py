"""Step 3: PPO with a per-token KL penalty to the SFT policy, plus the pretraining mix (PPO-ptx).

One iteration is two compiled calls with no host round trip inside either:
  `experience(state, frozen, prompts, key)`: sample responses, score them with the RM, take
     reference log-probs and values, build per-token rewards
     r_t = -beta * KL_t (+ RM score on the last token) and GAE advantages (reverse scan);
  `update(state, experience, ptx, key)`: epochs x minibatches as nested scans, a fresh shuffle
     every epoch, loss = policy + vf_coef * value + ptx_coef * ptx accumulated into ONE
     gradient (as in InstructGPT, not a separate optimizer step), then the KL controller.
The rollout's own log-probs are the old policy's (no second forward); the temperature divides
the logits wherever log-probs are taken, so both numerics paths agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.config import PPOConfig
from rlhf_jax.models import ModelConfig, forward, hidden_states, lm_logits, scalar_forward
from rlhf_jax.ops import (
    adaptive_kl_update,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    masked_mean,
    masked_whiten,
    per_token_rewards,
    token_logprobs,
)
from rlhf_jax.rollout.generate import _generate
from rlhf_jax.steps.reward import score_sequences
from rlhf_jax.steps.state import TrainState, accumulate_gradients, skip_metrics
from rlhf_jax.types import LossOut


class PPOState(struct.PyTreeNode):
    """Everything PPO changes: both models' weights and optimizers, beta, the EMA weights."""

    policy: TrainState
    value: TrainState
    beta: jax.Array  # KL coefficient; adapted in compiled code when ppo.adaptive_kl
    ema_params: Any  # EMA of the policy weights (InstructGPT: 0.992), or None
    iteration: jax.Array


class Frozen(NamedTuple):
    """Weights PPO reads but never changes."""

    ref: Any  # the SFT policy
    reward: Any  # the reward model {"trunk", "head"}


class Experience(NamedTuple):
    """One rollout batch; N = max_new_tokens, S = prompt length + N."""

    sequence_ids: jax.Array  # [B, S] prompt (left-padded) + response
    sequence_mask: jax.Array  # [B, S]
    response_ids: jax.Array  # [B, N]
    response_mask: jax.Array  # [B, N] 1 up to and including the first EOS
    logprobs: jax.Array  # [B, N] policy at sampling time (the "old" policy)
    ref_logprobs: jax.Array  # [B, N]
    values: jax.Array  # [B, N] value of the state before each response token
    rewards: jax.Array  # [B, N]
    advantages: jax.Array  # [B, N] whitened
    returns: jax.Array  # [B, N]
    scores: jax.Array  # [B] RM score (after the missing-EOS penalty)
    kl: jax.Array  # [B, N] per-token KL estimate to the reference


def init_ppo_state(policy_params, value_params, policy_tx, value_tx, ppo: PPOConfig) -> PPOState:
    """Fresh buffers for everything PPO updates: the update donates its state, and the SFT
    and RM weights these start from must survive as the frozen reference and reward model."""

    def copy(tree):
        return jax.tree.map(lambda x: jax.device_put(x, may_alias=False), tree)

    return PPOState(
        policy=TrainState.create(copy(policy_params), policy_tx),
        value=TrainState.create(copy(value_params), value_tx),
        beta=jnp.asarray(ppo.beta, jnp.float32),
        ema_params=copy(policy_params) if ppo.ema_decay > 0 else None,
        iteration=jnp.zeros((), jnp.int32),
    )


def _response_logits(cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int):
    """Logits that predict each response token: positions [P-1, S-1).

    The LM head (the largest matmul per token) runs on those N positions only, not on the
    whole sequence: the hidden states are sliced before it, which saves P/(P+N) of the head's
    work in the reference forward and in the policy's forward and backward.
    """
    h_BND = hidden_states(cfg, params, seq_ids, seq_mask)[:, prompt_len - 1 : -1]
    return lm_logits(cfg, params, h_BND)


def _response_values(cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int):
    return scalar_forward(cfg, params, seq_ids, seq_mask)[:, prompt_len - 1 : -1]


def make_experience_fn(
    policy_cfg: ModelConfig,
    value_cfg: ModelConfig,
    reward_cfg: ModelConfig,
    ppo: PPOConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> Callable:
    """`experience(state, frozen, prompt_ids, prompt_mask, key) -> (Experience, metrics)`."""
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def experience(state: PPOState, frozen: Frozen, prompt_ids, prompt_mask, key):
        p = prompt_ids.shape[1]
        gen = _generate(
            policy_cfg,
            state.policy.params,
            prompt_ids,
            prompt_mask,
            key,
            max_new_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature,
            top_k=None,
            top_p=None,
            eos_ids=tuple(eos_ids),
            pad_id=pad_id,
        )
        mask = gen.mask
        seq_ids = jnp.concatenate([prompt_ids, gen.tokens], axis=1)
        seq_mask = jnp.concatenate([prompt_mask.astype(mask.dtype), mask], axis=1)
        ref_logits = _response_logits(policy_cfg, frozen.ref, seq_ids, seq_mask, p)
        ref_logp = token_logprobs(ref_logits, gen.tokens, ppo.temperature) * mask
        values = _response_values(value_cfg, state.value.params, seq_ids, seq_mask, p) * mask
        scores = score_sequences(reward_cfg, frozen.reward, seq_ids, seq_mask)
        has_eos = jnp.any(jnp.isin(gen.tokens, eos) & (mask > 0), axis=1)
        # Truncation at the first EOS is the response mask itself; a response that never ends
        # is penalised (N-implementation-details: fixed low score, or score - penalty).
        if ppo.missing_eos_score is not None:
            scores = jnp.where(has_eos, scores, ppo.missing_eos_score)
        elif ppo.missing_eos_penalty is not None:
            scores = jnp.where(has_eos, scores, scores - ppo.missing_eos_penalty)
        rewards, kl = per_token_rewards(
            scores, gen.logprobs, ref_logp, mask, state.beta, ppo.kl_estimator
        )
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(rewards, values, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)
        exp = Experience(
            seq_ids,
            seq_mask,
            gen.tokens,
            mask,
            gen.logprobs,
            ref_logp,
            values,
            rewards,
            advantages,
            returns,
            scores,
            kl,
        )
        kl_per_seq = jnp.sum(kl * mask, axis=1)
        metrics = {
            "objective/scores": jnp.mean(scores),
            "objective/kl": jnp.mean(kl_per_seq),
            "objective/non_score_reward": -jnp.mean(state.beta * kl_per_seq),
            "objective/rlhf_reward": jnp.mean(scores - state.beta * kl_per_seq),
            "objective/beta": state.beta,
            "rollout/response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "rollout/eos_fraction": jnp.mean(has_eos.astype(jnp.float32)),
            "rollout/entropy_proxy": -masked_mean(gen.logprobs, mask),
            "ppo/value/explained_variance": explained_variance(values, returns, mask),
        }
        return exp, metrics

    return experience


def make_update_fn(
    policy_cfg: ModelConfig,
    value_cfg: ModelConfig,
    ppo: PPOConfig,
    policy_loss_fn: Callable[..., LossOut],
    value_loss_fn: Callable[..., LossOut],
    ptx_loss_fn: Callable[..., LossOut] | None,
    ptx_coef: float,
    grad_accum: int = 1,
) -> Callable:
    """`update(state, exp, ptx_batch, key) -> (state, metrics)`.

    ptx_batch: `input_ids`, `attention_mask` of shape [epochs, n_minibatches, ptx_bs, L]
    (one pretraining batch per minibatch), or None when ptx is off.
    """
    use_ptx = ptx_loss_fn is not None and ptx_coef > 0

    def minibatch_loss(params, mb):
        policy_params, value_params = params
        p = mb["sequence_ids"].shape[1] - mb["response_ids"].shape[1]
        logits = _response_logits(
            policy_cfg, policy_params, mb["sequence_ids"], mb["sequence_mask"], p
        )
        logp = token_logprobs(logits, mb["response_ids"], ppo.temperature)
        entropy = entropy_from_logits(logits, ppo.temperature)
        pol = policy_loss_fn(
            {"logprobs": logp, "entropy": entropy},
            {
                "old_logprobs": mb["logprobs"],
                "advantages": mb["advantages"],
                "response_mask": mb["response_mask"],
            },
        )
        values = _response_values(
            value_cfg, value_params, mb["sequence_ids"], mb["sequence_mask"], p
        )
        val = value_loss_fn(
            {"values": values},
            {
                "old_values": mb["values"],
                "returns": mb["returns"],
                "response_mask": mb["response_mask"],
            },
        )
        total = pol.loss + ppo.vf_coef * val.loss
        metrics = {**pol.metrics, **val.metrics}
        if use_ptx:
            ptx_batch = {"input_ids": mb["ptx_input_ids"], "attention_mask": mb["ptx_mask"]}
            ptx_logits = forward(
                policy_cfg, policy_params, ptx_batch["input_ids"], ptx_batch["attention_mask"]
            )
            ptx = ptx_loss_fn({"logits": ptx_logits}, ptx_batch)
            total = total + ptx_coef * ptx.loss
            metrics.update(ptx.metrics)
        metrics["ppo/loss/total"] = total
        return total, metrics

    def train_minibatch(state: PPOState, mb: dict):
        params = (state.policy.params, state.value.params)
        _, grads, metrics = accumulate_gradients(minibatch_loss, params, mb, grad_accum)
        policy = state.policy.apply_gradients(grads[0])
        value = state.value.apply_gradients(grads[1])
        ema = state.ema_params
        if ema is not None:
            d = ppo.ema_decay
            ema = jax.tree.map(lambda e, w: d * e + (1 - d) * w, ema, policy.params)
        return state.replace(policy=policy, value=value, ema_params=ema), metrics

    def update(state: PPOState, exp: Experience, ptx_batch: dict | None, key: jax.Array):
        b = exp.response_ids.shape[0]
        n_mb = b // ppo.minibatch_size
        fields = exp._asdict()

        def epoch(state, xs):
            epoch_key, ptx_epoch = xs
            order = jax.random.permutation(epoch_key, b).reshape(n_mb, ppo.minibatch_size)

            def one(state, ys):
                idx, ptx_mb = ys
                mb = {k: v[idx] for k, v in fields.items()}
                if use_ptx:
                    mb["ptx_input_ids"] = ptx_mb["input_ids"]
                    mb["ptx_mask"] = ptx_mb["attention_mask"]
                return train_minibatch(state, mb)

            return jax.lax.scan(one, state, (order, ptx_epoch))

        keys = jax.random.split(key, ppo.epochs)
        ptx_xs = ptx_batch if use_ptx else None
        state, metrics = jax.lax.scan(epoch, state, (keys, ptx_xs))
        metrics = jax.tree.map(jnp.mean, metrics)
        mean_kl = jnp.mean(jnp.sum(exp.kl * exp.response_mask, axis=1))
        beta = state.beta
        if ppo.adaptive_kl:
            beta = adaptive_kl_update(beta, mean_kl, b, ppo.kl_target, ppo.kl_horizon)
        metrics.update(skip_metrics(state.policy, "ppo/policy"))
        metrics.update(skip_metrics(state.value, "ppo/value"))
        return state.replace(beta=beta, iteration=state.iteration + 1), metrics

    return update
