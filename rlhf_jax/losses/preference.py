"""Offline preference losses (DPO and its variants) over K ranked completions per prompt.

The policy's implicit reward of a completion is `beta * (log pi(y|x) - log pi_ref(y|x))`, the
log-probs summed over the completion's tokens. Like the reward model's loss
(`losses/reward.py`), every loss here forms all C(K, 2) pairs of a prompt from its K values,
so a K-wise ranking trains on every comparison it holds with each completion forwarded once,
and (by default) each prompt weighs the same however many completions it has. With K = 2 this
is exactly DPO on chosen/rejected pairs.

outputs: `logps` [B, K], the policy's summed completion log-probs (the only input with a
gradient). batch: `ref_logps` [B, K] (the reference's, computed before training),
`completion_tokens` [B, K] (tokens each completion scores), `rank` [B, K] (0 best, ties
allowed), `completion_mask` [B, K] (0 on padded slots). `beta` is bound from `dpo.beta`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.config.schema import POSITIVE, Range
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean
from rlhf_jax.types import LossOut

READS = ("ref_logps", "completion_tokens", "rank", "completion_mask")
Weighting = Literal["prompt", "pair"]


def _winner_loser(batch: Arrays) -> jax.Array:
    """better[b, i, j] = 1 when completion i is ranked strictly above j and both are real."""
    real_BK = jnp.asarray(batch["completion_mask"]) != 0
    rank_BK = jnp.asarray(batch["rank"])
    both_BKK = real_BK[:, :, None] & real_BK[:, None, :]
    return (both_BKK & (rank_BK[:, :, None] < rank_BK[:, None, :])).astype(jnp.float32)


def _log_ratios(outputs: Arrays, batch: Arrays) -> jax.Array:
    """`log pi - log pi_ref` [B, K], 0 on padded slots (so junk there cannot leak in)."""
    real_BK = jnp.asarray(batch["completion_mask"]) != 0
    logps = jnp.asarray(outputs["logps"], jnp.float32)
    ref = jnp.asarray(batch["ref_logps"], jnp.float32)
    return jnp.where(real_BK, logps - ref, 0.0)


def _pairwise(x_BK: jax.Array) -> jax.Array:
    """x[b, i] - x[b, j] as [B, K, K]."""
    return x_BK[:, :, None] - x_BK[:, None, :]


def _reduce(per_pair_BKK: jax.Array, better_BKK: jax.Array, weighting: Weighting) -> jax.Array:
    """'prompt': the mean over each prompt's pairs, then over the prompts that have any (each
    prompt weighs the same, InstructGPT's treatment of rankings); 'pair': the mean over every
    pair of the batch (prompts with more completions weigh more)."""
    if weighting == "pair":
        return masked_mean(per_pair_BKK, better_BKK)
    if weighting != "prompt":
        raise RlhfJaxError(
            f"preference loss: weighting must be 'prompt' or 'pair', not {weighting!r}"
        )
    per_prompt_B = masked_mean(per_pair_BKK, better_BKK, axis=(1, 2))
    has_pairs_B = (jnp.sum(better_BKK, axis=(1, 2)) > 0).astype(jnp.float32)
    return masked_mean(per_prompt_B, has_pairs_B)


def _metrics(loss, outputs, batch, better_BKK, rewards_BK) -> dict[str, jax.Array]:
    """TRL's DPO metrics, over every pair of the batch: for K = 2 "chosen" and "rejected" are
    the pair's two completions; for K > 2 the winner and loser side of every pair."""
    logps_BK = jnp.where(jnp.asarray(batch["completion_mask"]) != 0, outputs["logps"], 0.0)
    pairs = jnp.sum(better_BKK)

    def winner_mean(x_BK):
        return jnp.sum(better_BKK * x_BK[:, :, None]) / jnp.maximum(pairs, 1.0)

    def loser_mean(x_BK):
        return jnp.sum(better_BKK * x_BK[:, None, :]) / jnp.maximum(pairs, 1.0)

    margin_BKK = _pairwise(rewards_BK)
    return {
        "dpo/loss": loss,
        "dpo/accuracy": masked_mean(margin_BKK > 0, better_BKK),
        "dpo/margin": masked_mean(margin_BKK, better_BKK),
        "dpo/rewards_chosen": winner_mean(rewards_BK),
        "dpo/rewards_rejected": loser_mean(rewards_BK),
        "dpo/logps_chosen": winner_mean(logps_BK),
        "dpo/logps_rejected": loser_mean(logps_BK),
        "dpo/pairs": pairs,
    }


def _pairwise_loss(outputs, batch, beta, weighting, per_pair) -> LossOut:
    """`per_pair(log_ratio [B, K]) -> [B, K, K]` reduced over the ranked pairs, with the
    implicit rewards `beta * log_ratio` in the metrics."""
    better_BKK = _winner_loser(batch)
    log_ratio_BK = _log_ratios(outputs, batch)
    loss = _reduce(per_pair(log_ratio_BK), better_BKK, weighting)
    return LossOut(loss, _metrics(loss, outputs, batch, better_BKK, beta * log_ratio_BK))


def _check_smoothing(label_smoothing: float, hi: float, name: str) -> None:
    if not 0.0 <= float(label_smoothing) < hi:
        raise RlhfJaxError(
            f"{name}: label_smoothing must be in [0, {hi:g}), got {label_smoothing!r}"
        )


DPO_RANGES = {"beta": POSITIVE, "label_smoothing": Range(0, 1, hi_open=True)}


@register_loss("preference", "default", reads=READS, ranges=DPO_RANGES)
@register_loss("preference", "dpo", reads=READS, ranges=DPO_RANGES)
def dpo(
    outputs: Arrays,
    batch: Arrays,
    beta: float,
    label_smoothing: float = 0.0,
    weighting: Weighting = "prompt",
) -> LossOut:
    """DPO (Rafailov et al. 2023) over every ranked pair (y_w, y_l):

    `-(1 - eps) log sigmoid(beta * d) - eps log sigmoid(-beta * d)`,
    `d = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)`.

    `label_smoothing` eps > 0 is conservative DPO (cDPO, Mitchell 2023): each label is assumed
    flipped with probability eps, so the loss no longer pushes the margin to infinity.
    """
    _check_smoothing(label_smoothing, 1.0, "dpo")

    def per_pair(log_ratio_BK):
        d_BKK = _pairwise(log_ratio_BK)
        out = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * d_BKK)
        if label_smoothing:
            out = out - label_smoothing * jax.nn.log_sigmoid(-beta * d_BKK)
        return out

    return _pairwise_loss(outputs, batch, beta, weighting, per_pair)


@register_loss(
    "preference",
    "robust_dpo",
    reads=READS,
    ranges={"beta": POSITIVE, "label_smoothing": Range(0, 0.5, hi_open=True)},
)
def robust_dpo(
    outputs: Arrays,
    batch: Arrays,
    beta: float,
    label_smoothing: float = 0.1,
    weighting: Weighting = "prompt",
) -> LossOut:
    """Robust DPO (rDPO, Chowdhury et al. 2024): an unbiased loss under labels flipped with
    probability eps = `label_smoothing` < 0.5:

    `[-(1 - eps) log sigmoid(beta * d) + eps log sigmoid(-beta * d)] / (1 - 2 eps)`.
    """
    _check_smoothing(label_smoothing, 0.5, "robust_dpo")
    eps = label_smoothing

    def per_pair(log_ratio_BK):
        d_BKK = beta * _pairwise(log_ratio_BK)
        flipped = eps * jax.nn.log_sigmoid(-d_BKK)
        return (-(1.0 - eps) * jax.nn.log_sigmoid(d_BKK) + flipped) / (1.0 - 2.0 * eps)

    return _pairwise_loss(outputs, batch, beta, weighting, per_pair)


@register_loss("preference", "ipo", reads=READS, ranges={"beta": POSITIVE})
def ipo(outputs: Arrays, batch: Arrays, beta: float, weighting: Weighting = "prompt") -> LossOut:
    """IPO (Azar et al. 2023) over every ranked pair: `(d - 1/(2 beta))^2` with `d` the
    difference of the per-token mean log-ratios (each completion's summed log-ratio divided
    by its token count: the length normalisation the IPO authors used, as TRL does). The
    margin is regressed to a finite target instead of pushed without bound."""
    tokens_BK = jnp.maximum(jnp.asarray(batch["completion_tokens"], jnp.float32), 1.0)

    def per_pair(log_ratio_BK):
        return (_pairwise(log_ratio_BK / tokens_BK) - 1.0 / (2.0 * beta)) ** 2

    return _pairwise_loss(outputs, batch, beta, weighting, per_pair)
