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
allowed), `completion_mask` [B, K] (0 on padded slots), and, from the step, the whole
batch's `pair_count` / `prompt_count` (`losses.accumulation`: exact under gradient
accumulation; else the given batch's). `beta` is bound from `dpo.beta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.config.schema import POSITIVE, Range
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses.blocks import (
    Weighting,
    pairwise,
    preference_log_ratios,
    preference_metrics,
    ranked_pairs,
    reduce_pairs,
)
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.types import LossOut

READS = (
    "ref_logps",
    "completion_tokens",
    "rank",
    "completion_mask",
    "pair_count",
    "prompt_count",
)


def _pairwise_loss(outputs, batch, beta, weighting, per_pair) -> LossOut:
    """`per_pair(log_ratio [B, K]) -> [B, K, K]` reduced over the ranked pairs, with the
    implicit rewards `beta * log_ratio` in the metrics."""
    better_BKK = ranked_pairs(batch)
    log_ratio_BK = preference_log_ratios(outputs, batch)
    loss = reduce_pairs(per_pair(log_ratio_BK), better_BKK, weighting, batch)
    return LossOut(loss, preference_metrics(loss, outputs, batch, better_BKK, beta * log_ratio_BK))


def _check_smoothing(label_smoothing: float, name: str) -> None:
    """eps is the probability that a label is flipped: at 0.5 the labels carry no signal (the
    loss only pulls the margin to 0), above it they are assumed mostly wrong and the policy
    would learn the reverse of the rankings."""
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise RlhfJaxError(
            f"{name}: label_smoothing must be in [0, 0.5) (the probability that a ranking is "
            f"wrong; at 0.5 or more the labels carry no signal or the reverse one), got "
            f"{label_smoothing!r}"
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
    _check_smoothing(label_smoothing, "dpo")

    def per_pair(log_ratio_BK):
        d_BKK = pairwise(log_ratio_BK)
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
    _check_smoothing(label_smoothing, "robust_dpo")
    eps = label_smoothing

    def per_pair(log_ratio_BK):
        d_BKK = beta * pairwise(log_ratio_BK)
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
        return (pairwise(log_ratio_BK / tokens_BK) - 1.0 / (2.0 * beta)) ** 2

    return _pairwise_loss(outputs, batch, beta, weighting, per_pair)
