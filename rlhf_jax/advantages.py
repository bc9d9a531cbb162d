"""Advantage estimators, chosen by name from config (`ppo.advantage`, `ppo.advantage_kwargs`).

Signature: `fn(batch, **hparams) -> AdvantageOut`, pure and jittable. `batch` holds, over one
rollout of B sampled responses of N tokens:
  rewards [B, N]        per-token reward: the score on each row's last real token, minus
                        beta * KL_t on every token when `ppo.kl_penalty=reward`
  response_mask [B, N]  1 up to and including the first EOS
  scores [B]            the sequence score (reward model or reward function, EOS rule applied)
  group_ids [B]         samples of the same prompt share an id (ppo.samples_per_prompt of them)
  values [B, N]         the critic's values, only for estimators declared `needs_critic`
  response_ids [B, N]   the sampled tokens
  advantage_state       the estimator's own state, only for estimators that declare `state`
Estimators declare `needs_critic` (no critic model exists otherwise: no value weights,
optimizer state, forward, backward or checkpoint) and `min_group_size` (checked against
`ppo.samples_per_prompt` when the config is loaded). An estimator that keeps state across
iterations (a moving-average baseline) declares `state=init`, a function of no arguments
returning its initial pytree of arrays: the state lives in the compiled RL state
(`RLState.advantage_state`, checkpointed and restored with it), the estimator reads it as
`batch["advantage_state"]` and returns the next one in `AdvantageOut.state` (same structure,
shapes and dtypes). The sequence return R_i below is
`sum_t rewards_{i,t}`: the score, minus the KL penalty when it is in the reward.

A fork registers its own with `@register_advantage("name")`, or names a function
`package.module:function` in the config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import registry
from rlhf_jax.config.schema import FRACTION, POSITIVE, Range
from rlhf_jax.ops import (
    discounted_returns,
    gae_advantages,
    group_mean,
    group_std,
    last_token_onehot,
    leave_one_out_mean,
    masked_sum,
    masked_whiten,
)

Arrays = Mapping[str, jax.Array]


class AdvantageOut(NamedTuple):
    """advantages [B, N] (0 on padding); returns [B, N], the critic's regression targets (None
    without a critic); metrics: flat scalars with slash names; state: the estimator's next
    state, only for an estimator that declares `state` (None otherwise)."""

    advantages: jax.Array
    returns: jax.Array | None
    metrics: dict[str, jax.Array]
    state: Any = None


def register_advantage(
    name: str,
    needs_critic: bool = False,
    min_group_size: int = 1,
    reads: tuple = (),
    ranges: Mapping[str, Range] | None = None,
    state: Callable[[], Any] | None = None,
) -> Callable:
    """Decorator registering an estimator under `name` with the facts the run needs
    (`ranges`: the values each numeric hyperparameter accepts, checked at config load;
    `state`: the initial state of an estimator that keeps one)."""
    return registry.register(
        "advantage",
        name,
        needs_critic=needs_critic,
        min_group_size=min_group_size,
        reads=reads or ("rewards", "response_mask", "scores", "group_ids"),
        ranges=dict(ranges or {}),
        state=state,
    )


def get_advantage(name: str = "gae", **hparams: Any) -> Callable[[Arrays], AdvantageOut]:
    """The estimator registered as `name` (or "package.module:function"), hparams bound."""
    return registry.resolve("advantage", name, **hparams)


def estimator_needs_critic(name: str) -> bool:
    """Whether the registered advantage estimator `name` trains a critic: what it declares
    (`registry.declare(needs_critic=True)`), not what a custom value loss's metrics say."""
    return bool(registry.info(registry.lookup("advantage", name)).get("needs_critic", False))


def _mask(batch: Arrays) -> jax.Array:
    return jnp.asarray(batch["response_mask"], jnp.float32)


def sequence_returns(batch: Arrays) -> jax.Array:
    """[B] `R_i = sum_t rewards_{i,t}` over the real tokens of each response."""
    return masked_sum(batch["rewards"], _mask(batch), axis=1)


def _per_token(adv_B: jax.Array, mask_BN: jax.Array) -> jax.Array:
    """One advantage per sequence, on each of its real tokens."""
    return adv_B[:, None] * mask_BN


def _metrics(adv_BN: jax.Array, mask_BN: jax.Array) -> dict[str, jax.Array]:
    n = jnp.maximum(jnp.sum(mask_BN), 1.0)
    mean = jnp.sum(adv_BN * mask_BN) / n
    return {
        "advantage/mean": mean,
        "advantage/std": jnp.sqrt(jnp.sum(jnp.square(adv_BN - mean) * mask_BN) / n),
    }


@register_advantage(
    "gae",
    needs_critic=True,
    reads=("rewards", "response_mask", "values"),
    ranges={"gamma": FRACTION, "lam": FRACTION},
)
def gae(
    batch: Arrays,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten: bool = True,
) -> AdvantageOut:
    """Generalised advantage estimation (Schulman et al. 2016) with the critic's values:
    `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = sum_l (gamma lam)^l delta_{t+l}`, returns
    `A_t + V_t`; advantages whitened over the response mask (N-implementation-details), the
    rewards optionally scaled first. InstructGPT's PPO: gamma 1, lambda 0.95.
    """
    mask_BN = _mask(batch)
    rewards_BN = batch["rewards"]
    if whiten_rewards:
        rewards_BN = masked_whiten(rewards_BN, mask_BN, shift_mean=False)
    adv_BN, returns_BN = gae_advantages(rewards_BN, batch["values"], mask_BN, gamma, lam)
    if whiten:
        adv_BN = masked_whiten(adv_BN, mask_BN)
    return AdvantageOut(adv_BN, returns_BN, _metrics(adv_BN, mask_BN))


# eps > 0: a group whose returns all agree has std 0, and (R - mean) / (0 + 0) is 0/0 = NaN.
@register_advantage("grpo", min_group_size=2, ranges={"eps": POSITIVE})
def grpo(batch: Arrays, eps: float = 1e-6) -> AdvantageOut:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, outcome supervision):
    `A_i = (R_i - mean_G R) / (std_G R + eps)` on every token of response i, with the
    unbiased group standard deviation (as TRL and verl compute it). A group whose returns are
    all equal gets advantage 0 (no signal)."""
    mask_BN, ids_B = _mask(batch), batch["group_ids"]
    r_B = sequence_returns(batch)
    adv_B = (r_B - group_mean(r_B, ids_B)) / (group_std(r_B, ids_B) + eps)
    adv_BN = _per_token(adv_B, mask_BN)
    return AdvantageOut(adv_BN, None, _metrics(adv_BN, mask_BN))


@register_advantage("dr_grpo", min_group_size=2)
def dr_grpo(batch: Arrays) -> AdvantageOut:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): `A_i = R_i - mean_G R`, no division by the
    group's std (which up-weights groups of near-equal returns). Pair it with the
    `seq_mean_token_sum_norm` reduction, the paper's constant normaliser."""
    mask_BN, ids_B = _mask(batch), batch["group_ids"]
    r_B = sequence_returns(batch)
    adv_BN = _per_token(r_B - group_mean(r_B, ids_B), mask_BN)
    return AdvantageOut(adv_BN, None, _metrics(adv_BN, mask_BN))


@register_advantage("rloo", min_group_size=2)
def rloo(batch: Arrays) -> AdvantageOut:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): the baseline of sample i is the mean
    return of the other G - 1 samples of its prompt, `A_i = R_i - mean_{j != i} R_j`."""
    mask_BN, ids_B = _mask(batch), batch["group_ids"]
    r_B = sequence_returns(batch)
    adv_BN = _per_token(r_B - leave_one_out_mean(r_B, ids_B), mask_BN)
    return AdvantageOut(adv_BN, None, _metrics(adv_BN, mask_BN))


@register_advantage("reinforce_pp", ranges={"gamma": FRACTION})
def reinforce_pp(batch: Arrays, gamma: float = 1.0) -> AdvantageOut:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): the per-token reward (score at EOS, minus
    beta * KL_t when the KL is in the reward) summed to go, `G_t = sum_{l >= t} gamma^(l-t) r_l`,
    then whitened over every real token of the batch (the global normalisation that replaces a
    critic). Works with one sample per prompt."""
    mask_BN = _mask(batch)
    adv_BN = masked_whiten(discounted_returns(batch["rewards"], mask_BN, gamma), mask_BN)
    return AdvantageOut(adv_BN, None, _metrics(adv_BN, mask_BN))


@register_advantage("reinforce_pp_baseline", min_group_size=2, ranges={"gamma": FRACTION})
def reinforce_pp_baseline(batch: Arrays, gamma: float = 1.0) -> AdvantageOut:
    """REINFORCE++-baseline: the group's mean score is subtracted from each score first (on the
    last token, where the score sits), then reward-to-go and batch whitening as in
    `reinforce_pp`."""
    mask_BN, ids_B = _mask(batch), batch["group_ids"]
    baseline_B = group_mean(batch["scores"], ids_B)
    rewards_BN = batch["rewards"] - baseline_B[:, None] * last_token_onehot(mask_BN)
    adv_BN = masked_whiten(discounted_returns(rewards_BN, mask_BN, gamma), mask_BN)
    return AdvantageOut(adv_BN, None, _metrics(adv_BN, mask_BN))
