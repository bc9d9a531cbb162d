"""Making experience from small parts, all compiled: sample, score, reference log-probs,
values, per-token rewards, advantages.

  sample(policy_params, prompts, key) -> Rollout      G = ppo.samples_per_prompt responses per
                                                      prompt (a group), with group ids
  score(frozen, rollout, scores) -> Scored            the reward model's scores (unless the host
                                                      passes a reward function's), then the
                                                      missing-EOS rule: the scores every later
                                                      part sees
  (rollout filters, loops/rollout_stages.py)          which groups train (with ppo.rollout_filters)
  finish_scored(state, frozen, rollout, scored)       reference log-probs only with a KL term,
      -> Experience                                   values only with a critic, the KL in the
                                                      reward when configured, then the estimator
  finish = finish_scored(score(...))                  without filters
  experience = finish(sample(...), scores=None)       one compiled call when the RM scores

The rollout's own log-probs are the old policy's (no second forward). Every log-prob of a
rollout (the old policy's, the reference's, and the trainer's) is over the support each token
was sampled from: the whole vocabulary, or with top-k / top-p the kept set the sampler records
(`Rollout.support`), so the first ratio pi / pi_old is exactly 1, the KL compares two
distributions over the same tokens, and no log-prob is ever -inf (docs/algorithms.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.config import PPOConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.metrics import merged_metrics
from rlhf_jax.models import ModelConfig, hidden_states, lm_logits, scalar_forward, scalar_head
from rlhf_jax.models.lora import without_lora
from rlhf_jax.models.token_stats import token_logprobs_from_hidden
from rlhf_jax.ops import (
    explained_variance,
    groups_all_equal,
    kl_estimate,
    last_token_onehot,
    masked_mean,
    per_token_rewards,
)
from rlhf_jax.rollout import generate
from rlhf_jax.steps.algorithm import RLAlgorithm
from rlhf_jax.steps.reward import score_sequences
from rlhf_jax.steps.rl_state import Frozen, RLState, policy_weights


class Rollout(NamedTuple):
    """Sampled responses; B = prompts x G, N = max_new_tokens, S = prompt length + N."""

    sequence_ids: jax.Array  # [B, S] prompt (left-padded) + response
    sequence_mask: jax.Array  # [B, S]
    response_ids: jax.Array  # [B, N]
    response_mask: jax.Array  # [B, N] 1 up to and including the first EOS
    logprobs: jax.Array  # [B, N] under the sampling distribution (the "old" policy)
    group_ids: jax.Array  # [B] int32: responses to the same prompt share an id
    # [B, N, ceil(V / 32)] uint32: the kept set each token was drawn from (ops.pack_support),
    # with top-k / top-p only
    support: jax.Array | None = None


class Experience(NamedTuple):
    """One rollout batch made ready for the update; optional parts are None when unused."""

    sequence_ids: jax.Array
    sequence_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array  # [B, N] the old policy's
    ref_logprobs: jax.Array | None  # [B, N], with a KL term only
    values: jax.Array | None  # [B, N] value of the state before each token, with a critic only
    rewards: jax.Array  # [B, N] per-token reward (score on the last token, - beta KL_t if so)
    advantages: jax.Array  # [B, N]
    returns: jax.Array | None  # [B, N] the critic's targets, with a critic only
    scores: jax.Array  # [B] sequence score (after the missing-EOS rule)
    kl: jax.Array | None  # [B, N] per-token KL estimate to the reference, with one only
    group_ids: jax.Array  # [B]
    support: jax.Array | None = None  # the rollout's, with top-k / top-p only


def response_hidden(cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int):
    """Hidden states that predict each response token: positions [P-1, S-1).

    The LM head (the largest matmul per token) then runs on those N positions only, not on
    the whole sequence, which saves P/(P+N) of the head's work in the reference forward and
    in the policy's forward and backward.
    """
    return hidden_states(cfg, params, seq_ids, seq_mask)[:, prompt_len - 1 : -1]


def response_logits(cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int):
    """Logits [B, N, V] that predict each response token (`response_hidden`)."""
    return lm_logits(cfg, params, response_hidden(cfg, params, seq_ids, seq_mask, prompt_len))


def response_logprobs(
    cfg: ModelConfig,
    params,
    seq_ids: jax.Array,
    seq_mask: jax.Array,
    response_ids: jax.Array,
    temperature: float,
    support: jax.Array | None = None,
    values: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`(log-probs, entropies, values)` [B, N] of the response tokens under the sampling
    distribution (temperature, the recorded support), from ONE trunk forward; values from
    the policy's own value head (`ppo.critic=shared_trunk`) when asked, else None. The
    [B, N, V] logits are chunked away when large (`models.token_stats`)."""
    p = seq_ids.shape[1] - response_ids.shape[1]
    h_BND = response_hidden(cfg, params, seq_ids, seq_mask, p)
    return logprobs_from_hidden(cfg, params, h_BND, response_ids, temperature, support, values)


def logprobs_from_hidden(
    cfg: ModelConfig,
    params,
    h_BND: jax.Array,
    response_ids: jax.Array,
    temperature: float,
    support: jax.Array | None = None,
    values: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`response_logprobs` from the hidden states that predict the response tokens (padded
    rows' or packed rows' gathered back, `steps/rl_pack.py`)."""
    logp, entropy = token_logprobs_from_hidden(
        cfg, params, h_BND, response_ids, temperature, support
    )
    return logp, entropy, (scalar_head(params["value_head"], h_BND) if values else None)


def response_values(cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int):
    return scalar_forward(cfg, params, seq_ids, seq_mask)[:, prompt_len - 1 : -1]


def response_logits_values(
    cfg: ModelConfig, params, seq_ids, seq_mask, prompt_len: int, logits: bool = True
):
    """`(logits, values)` at the response positions from ONE trunk forward of a policy that
    carries its critic's head (`params["value_head"]`, `ppo.critic=shared_trunk`); logits
    None when not asked for (the experience needs only the values)."""
    h_BND = response_hidden(cfg, params, seq_ids, seq_mask, prompt_len)
    values = scalar_head(params["value_head"], h_BND)
    return (lm_logits(cfg, params, h_BND) if logits else None), values


def in_micro_batches(fn: Callable, rows: int, *arrays):
    """`fn(*arrays)` computed `rows` rows at a time (a `lax.map` over micro-batches, one after
    another, so only one micro-batch's activations and logits are alive) and the results
    joined along the rows. `rows` 0, or the whole batch: one call. None arrays pass through.
    Every row's result depends on that row only, so this is `fn(*arrays)` up to the float
    rounding of matmuls of a different row count."""
    b = arrays[0].shape[0]
    if not rows or rows >= b:
        return fn(*arrays)
    if b % rows:
        raise RlhfJaxError(
            f"config key 'ppo.experience_micro_batch': {rows} does not divide the {b} "
            "responses of an iteration"
        )
    split = jax.tree.map(lambda a: a.reshape(b // rows, rows, *a.shape[1:]), arrays)
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda o: o.reshape(b, *o.shape[2:]), out)


def make_sample_fn(
    policy_cfg: ModelConfig, ppo: PPOConfig, eos_ids: tuple[int, ...], pad_id: int
) -> Callable:
    """`sample(policy_params, prompt_ids, prompt_mask, key) -> Rollout`: each of the P prompts
    answered G = ppo.samples_per_prompt times (rows p*G .. p*G + G - 1 form group p)."""
    g = ppo.samples_per_prompt

    def sample(policy_params, prompt_ids, prompt_mask, key) -> Rollout:
        # Each prompt is prefilled once and its G samples decoded from copies of its cache.
        gen = generate(
            policy_cfg,
            policy_params,
            prompt_ids,
            prompt_mask,
            key,
            ppo.max_new_tokens,
            temperature=ppo.temperature,
            top_k=ppo.top_k,
            top_p=ppo.top_p,
            eos_id=tuple(eos_ids),
            pad_id=pad_id,
            record_support=True,
            samples_per_prompt=g,
            compact=ppo.compact_finished_rows,
            layer_scan=ppo.decode_layer_scan,
        )
        if g > 1:
            prompt_ids = jnp.repeat(prompt_ids, g, axis=0)
            prompt_mask = jnp.repeat(prompt_mask, g, axis=0)
        mask = gen.mask
        return Rollout(
            sequence_ids=jnp.concatenate([prompt_ids, gen.tokens], axis=1),
            sequence_mask=jnp.concatenate([prompt_mask.astype(mask.dtype), mask], axis=1),
            response_ids=gen.tokens,
            response_mask=mask,
            logprobs=gen.logprobs,
            group_ids=jnp.arange(prompt_ids.shape[0], dtype=jnp.int32) // g,
            support=gen.support,
        )

    return sample


class Scored(NamedTuple):
    """A rollout's sequence scores as every later part sees them."""

    scores: jax.Array  # [B] float32, after the missing-EOS rule
    has_eos: jax.Array  # [B] bool: the response ended (emitted an EOS)


def missing_eos_rule(scores, r: Rollout, eos_ids: tuple[int, ...], ppo: PPOConfig) -> Scored:
    """A response that never ends is penalised (N-implementation-details: a fixed low score,
    `ppo.missing_eos_score`, or `score - ppo.missing_eos_penalty`). Truncation at the first
    EOS is the response mask itself."""
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    has_eos = jnp.any(jnp.isin(r.response_ids, eos) & (r.response_mask > 0), axis=1)
    if ppo.missing_eos_score is not None:
        scores = jnp.where(has_eos, scores, ppo.missing_eos_score)
    elif ppo.missing_eos_penalty is not None:
        scores = jnp.where(has_eos, scores, scores - ppo.missing_eos_penalty)
    return Scored(scores, has_eos)


def make_score_fn(
    reward_cfg: ModelConfig | None, ppo: PPOConfig, eos_ids: tuple[int, ...]
) -> Callable:
    """`score(frozen, rollout, scores=None) -> Scored`: `scores` [B] from a reward function,
    or None for the reward model in `frozen.reward`; then the missing-EOS rule."""

    def score(frozen: Frozen, r: Rollout, scores=None) -> Scored:
        if scores is None:  # the reward model, `ppo.experience_micro_batch` rows at a time
            score_fn = functools.partial(score_sequences, reward_cfg, frozen.reward)
            rows = ppo.experience_micro_batch
            scores = in_micro_batches(score_fn, rows, r.sequence_ids, r.sequence_mask)
        return missing_eos_rule(scores, r, eos_ids, ppo)

    return score


def make_finish_fn(
    policy_cfg: ModelConfig,
    critic_cfg: ModelConfig | None,
    reward_cfg: ModelConfig | None,
    ppo: PPOConfig,
    algo: RLAlgorithm,
    eos_ids: tuple[int, ...],
) -> Callable:
    """`finish(state, frozen, rollout, scores=None) -> (Experience, metrics)`: score (`scores`
    [B] from a reward function, or None for the reward model in `frozen.reward`), then
    `finish_scored`."""
    score = make_score_fn(reward_cfg, ppo, eos_ids)
    finish_scored = make_scored_finish_fn(policy_cfg, critic_cfg, ppo, algo)

    def finish(state: RLState, frozen: Frozen, r: Rollout, scores=None):
        return finish_scored(state, frozen, r, score(frozen, r, scores))

    return finish


def make_scored_finish_fn(
    policy_cfg: ModelConfig, critic_cfg: ModelConfig | None, ppo: PPOConfig, algo: RLAlgorithm
) -> Callable:
    """`finish_scored(state, frozen, rollout, scored) -> (Experience, metrics)`: the rest of
    the experience of a scored rollout."""
    kl_in_reward = algo.kl_penalty == "reward"
    rows = ppo.experience_micro_batch

    def finish_scored(state: RLState, frozen: Frozen, r: Rollout, scored: Scored):
        p = r.sequence_ids.shape[1] - r.response_ids.shape[1]
        mask = r.response_mask
        seqs = (r.sequence_ids, r.sequence_mask)
        ref_logp = values = kl = None
        if algo.uses_reference:
            # The reference is the SFT policy: for a LoRA policy, its base with adapters off.
            ref_cfg = without_lora(policy_cfg)

            def ref_fn(ids, seq_mask, response_ids, support):
                return response_logprobs(
                    ref_cfg, frozen.ref, ids, seq_mask, response_ids, ppo.temperature, support
                )[0]

            ref_logp = in_micro_batches(ref_fn, rows, *seqs, r.response_ids, r.support) * mask
        if algo.shared_critic:  # the value head on the policy's trunk
            policy = policy_weights(policy_cfg, state, frozen)

            def values_fn(ids, seq_mask):
                return response_logits_values(policy_cfg, policy, ids, seq_mask, p, False)[1]

            values = in_micro_batches(values_fn, rows, *seqs) * mask
        elif algo.needs_critic:

            def values_fn(ids, seq_mask):
                return response_values(critic_cfg, state.critic.model_params, ids, seq_mask, p)

            values = in_micro_batches(values_fn, rows, *seqs) * mask
        scores, has_eos = scored
        if kl_in_reward:
            rewards, kl = per_token_rewards(
                scores, r.logprobs, ref_logp, mask, state.beta, algo.kl_estimator
            )
        else:
            rewards = jnp.asarray(scores, jnp.float32)[:, None] * last_token_onehot(mask)
            if ref_logp is not None:
                kl = kl_estimate(r.logprobs, ref_logp, algo.kl_estimator, mask)
        adv = algo.advantage(
            advantage_batch(rewards, mask, scores, r, values, state.advantage_state)
        )
        exp = Experience(
            sequence_ids=r.sequence_ids,
            sequence_mask=r.sequence_mask,
            response_ids=r.response_ids,
            response_mask=mask,
            logprobs=r.logprobs,
            ref_logprobs=ref_logp,
            values=values,
            rewards=rewards,
            advantages=adv.advantages,
            returns=adv.returns,
            scores=scores,
            kl=kl,
            group_ids=r.group_ids,
            support=r.support,
        )
        return exp, _metrics(state, exp, has_eos, kl_in_reward, ppo.samples_per_prompt, adv)

    return finish_scored


def advantage_batch(rewards, mask, scores, r, values, advantage_state) -> dict:
    """What an estimator reads (`rlhf_jax.advantages`); `r`: the Rollout or Experience."""
    batch = {
        "rewards": rewards,
        "response_mask": mask,
        "scores": scores,
        "group_ids": r.group_ids,
        "response_ids": r.response_ids,
    }
    if values is not None:
        batch["values"] = values
    if advantage_state is not None:
        batch["advantage_state"] = advantage_state
    return batch


def _metrics(state: RLState, exp: Experience, has_eos, kl_in_reward: bool, g: int, adv) -> dict:
    mask = exp.response_mask
    metrics = {
        "objective/scores": jnp.mean(exp.scores),
        "objective/beta": state.beta,
        "rollout/response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "rollout/eos_fraction": jnp.mean(has_eos.astype(jnp.float32)),
        "rollout/entropy_proxy": -masked_mean(exp.logprobs, mask),
    }
    if exp.kl is not None:
        kl_per_seq = jnp.sum(exp.kl * mask, axis=1)
        metrics["objective/kl"] = jnp.mean(kl_per_seq)
        metrics["objective/rlhf_reward"] = jnp.mean(exp.scores - state.beta * kl_per_seq)
        if kl_in_reward:
            metrics["objective/non_score_reward"] = -jnp.mean(state.beta * kl_per_seq)
    if exp.values is not None:
        metrics["ppo/value/explained_variance"] = explained_variance(exp.values, exp.returns, mask)
    if g > 1:  # groups whose responses all scored the same give a group baseline no signal
        metrics["rollout/groups_all_equal"] = jnp.mean(groups_all_equal(exp.scores, exp.group_ids))
    return merged_metrics(
        ("the experience itself", metrics), ("the advantage estimator (ppo.advantage)", adv.metrics)
    )


def make_experience_fn(
    policy_cfg: ModelConfig,
    critic_cfg: ModelConfig | None,
    reward_cfg: ModelConfig | None,
    ppo: PPOConfig,
    algo: RLAlgorithm,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> Callable:
    """`experience(state, frozen, prompt_ids, prompt_mask, key) -> (Experience, metrics)`:
    sampling and scoring by the reward model in one function (one compiled call)."""
    sample = make_sample_fn(policy_cfg, ppo, eos_ids, pad_id)
    finish = make_finish_fn(policy_cfg, critic_cfg, reward_cfg, ppo, algo, eos_ids)

    def experience(state: RLState, frozen: Frozen, prompt_ids, prompt_mask, key):
        policy = policy_weights(policy_cfg, state, frozen)
        return finish(state, frozen, sample(policy, prompt_ids, prompt_mask, key))

    return experience
