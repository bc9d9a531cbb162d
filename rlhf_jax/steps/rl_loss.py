"""The RL update's loss of one (micro-)batch: policy loss (+ beta * KL when
`ppo.kl_penalty=loss`) (+ vf_coef * critic loss) (+ ptx_coef * pretraining loss), with the
metrics the update writes itself (the rollout/trainer log-prob mismatch, the total).

A fork changes a term through its part (`ppo.policy_loss`, `ppo.value_loss`, `ptx.loss`);
this function only sums them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.metrics import merged_metrics
from rlhf_jax.ops import kl_estimate, masked_mean, reduce_tokens
from rlhf_jax.steps.experience import response_logprobs, response_values
from rlhf_jax.steps.rl_inputs import Normalisers, UpdateConfig
from rlhf_jax.steps.rl_pack import pack_plan, packed_response_logprobs, packed_response_values
from rlhf_jax.steps.sft import lm_outputs


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


def minibatch_loss(
    cfg: UpdateConfig, params: tuple, mb: dict, norm: Normalisers
) -> tuple[jax.Array, dict]:
    """`(total loss, metrics)` of `mb` under the whole `(policy, critic)` weights `params`."""
    policy_params, critic_params = params
    algo, ppo = cfg.algo, cfg.ppo
    scalars = norm.scalars()
    mask = mb["response_mask"]
    # Over the support the rollout recorded (with top-k / top-p), not this policy's own
    # top-k: a sampled token stays in it whatever the update does to the weights. With a
    # shared trunk, the values come from the same forward.
    library: dict = {}  # what the update writes itself, next to the parts' metrics
    seq_ids, seq_mask, response_ids = mb["sequence_ids"], mb["sequence_mask"], mb["response_ids"]
    plan = None
    if cfg.pack is None:
        logp, entropy, values = response_logprobs(
            cfg.policy_cfg, policy_params, seq_ids, seq_mask, response_ids, ppo.temperature,
            mb.get("support"), values=algo.shared_critic,
        )  # fmt: skip
    else:  # the trunks and heads on packed rows and response slots, the losses padded
        # (rl_pack.py); the plan reads no weights, so a separate critic shares it.
        plan = pack_plan(seq_ids, seq_mask, response_ids.shape[1], cfg.pack)
        logp, entropy, values = packed_response_logprobs(
            cfg.policy_cfg, policy_params, plan, response_ids, ppo.temperature,
            support=mb.get("support"), values=algo.shared_critic,
        )  # fmt: skip
        library["ppo/pack_overflow"] = plan.overflow.astype(jnp.float32)
    batch = loss_batch(mb, scalars)
    pol = algo.policy_loss({"logprobs": logp, "entropy": entropy}, batch)
    total = pol.loss
    sources = [("the policy loss (ppo.policy_loss)", pol.metrics)]
    # The trainer recomputes what the sampler computed: on the first minibatch (weights
    # still those that sampled) the two must agree to float rounding.
    gap = jnp.where(mask != 0, jnp.abs(logp - mb["logprobs"]), 0.0)
    library["rollout/logprob_mismatch_mean"] = masked_mean(gap, mask, count=scalars["token_count"])
    library["rollout/logprob_mismatch_max"] = jnp.max(gap)
    if cfg.kl_in_loss:
        kl = kl_estimate(logp, mb["ref_logprobs"], algo.kl_estimator, mask)
        kl_loss = reduce_tokens(
            kl, mask, algo.reduction, scalars["token_count"], scalars["sequence_count"]
        )
        total = total + scalars["beta"] * kl_loss
        library["ppo/kl_loss"] = kl_loss
    if algo.needs_critic:
        if values is None and plan is not None:  # a separate critic on the same plan
            values = packed_response_values(cfg.critic_cfg, critic_params, plan)
        elif values is None:
            p = seq_ids.shape[1] - response_ids.shape[1]
            values = response_values(cfg.critic_cfg, critic_params, seq_ids, seq_mask, p)
        val = algo.value_loss({"values": values}, batch)
        total = total + ppo.vf_coef * val.loss
        sources.append(("the value loss (ppo.value_loss)", val.metrics))
    if cfg.use_ptx:
        total = total + _ptx_term(cfg, policy_params, mb, norm, sources)
    library["ppo/loss/total"] = total
    return total, merged_metrics(*sources, ("the RL update itself", library))


def _ptx_term(
    cfg: UpdateConfig, policy_params, mb: dict, norm: Normalisers, sources: list
) -> jax.Array:
    """ptx_coef * the pretraining loss of the minibatch's ptx batch (its metrics go to
    `sources`)."""
    ptx_batch = {"input_ids": mb["ptx_input_ids"], "attention_mask": mb["ptx_mask"]}
    ptx_batch.update(norm.ptx)
    ptx_outputs = lm_outputs(
        cfg.policy_cfg, policy_params, ptx_batch["input_ids"], ptx_batch["attention_mask"]
    )
    ptx = cfg.ptx_loss_fn(ptx_outputs, ptx_batch)
    sources.append(("the pretraining loss (ptx.loss)", ptx.metrics))
    return cfg.ptx_coef * ptx.loss
