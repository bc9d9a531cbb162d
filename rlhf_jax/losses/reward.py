"""Step 2: reward-model losses over K ranked completions per prompt.

All pairs are formed here, vectorised as [B, K, K], from the K scalar rewards of each prompt:
each completion is forwarded once, not K - 1 times (InstructGPT section 3.5).

Denominators are the whole batch's `pair_count` / `prompt_count` when the step passes them
(`losses.accumulation`: exact under gradient accumulation), else the given batch's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.accumulation import count_or_local
from rlhf_jax.losses.blocks import pairwise, ranked_pairs
from rlhf_jax.losses.registry import Arrays, register_loss
from rlhf_jax.ops import masked_mean
from rlhf_jax.types import LossOut

READS = ("rank", "completion_mask", "pair_count", "prompt_count")


def _pairs(outputs: Arrays, batch: Arrays) -> tuple[jax.Array, jax.Array]:
    """`(better_BKK, diff_BKK)`: better[b, i, j] = 1 when completion i is ranked strictly above j
    (rank 0 is best) and both are real; diff[b, i, j] = r_i - r_j.

    Equal ranks are ties, not comparisons. Padded completions (completion_mask 0) form no pair,
    and their rewards are zeroed before the difference so garbage there cannot leak in.
    """
    real_BK = jnp.asarray(batch["completion_mask"]) != 0
    rewards_BK = jnp.where(real_BK, jnp.asarray(outputs["rewards"], jnp.float32), 0.0)
    return ranked_pairs(batch), pairwise(rewards_BK)


def _pair_count(batch: Arrays, better_BKK: jax.Array) -> jax.Array:
    return count_or_local(batch, "pair_count", jnp.sum(better_BKK))


def _metrics(
    loss: jax.Array, better_BKK: jax.Array, diff_BKK: jax.Array, n_pairs: jax.Array
) -> dict[str, jax.Array]:
    """Accuracy and margin are over every pair of the whole batch (not per prompt)."""
    return {
        "rm/loss": loss,
        "rm/accuracy": masked_mean(diff_BKK > 0, better_BKK, count=n_pairs),
        "rm/margin": masked_mean(diff_BKK, better_BKK, count=n_pairs),
        "rm/pairs": jnp.sum(better_BKK),
    }


@register_loss("reward", "default", reads=READS)
@register_loss("reward", "kwise_ranking", reads=READS)
def kwise_ranking(outputs: Arrays, batch: Arrays) -> LossOut:
    """InstructGPT eq. 1, each prompt weighted equally:

    `loss = 1/B' sum_x [ -1/C_x sum_{(y_w, y_l) of x} log sigmoid(r(x, y_w) - r(x, y_l)) ]`

    with C_x the number of comparisons of prompt x (C(K, 2) without ties) and B' the prompts
    of the whole batch that have at least one comparison (`prompt_count`). A prompt with 9
    completions (36 pairs) weighs the same as one with 2 (1 pair).

    outputs: rewards [B, K]. batch: rank [B, K] int (0 best, ties allowed),
    completion_mask [B, K] (K padded to the largest K of the batch).
    """
    better_BKK, diff_BKK = _pairs(outputs, batch)
    logsig_BKK = jax.nn.log_sigmoid(diff_BKK)
    # Denominator C_x per prompt; a prompt without comparisons gives 0 and is dropped below.
    per_prompt_B = -masked_mean(logsig_BKK, better_BKK, axis=(1, 2))
    has_pairs_B = (jnp.sum(better_BKK, axis=(1, 2)) > 0).astype(jnp.float32)
    n_prompts = count_or_local(batch, "prompt_count", jnp.sum(has_pairs_B))
    loss = masked_mean(per_prompt_B, has_pairs_B, count=n_prompts)
    return LossOut(loss, _metrics(loss, better_BKK, diff_BKK, _pair_count(batch, better_BKK)))


@register_loss("reward", "pairwise_mean", reads=READS)
def pairwise_mean(outputs: Arrays, batch: Arrays) -> LossOut:
    """`loss = -1/P sum_{all pairs of the batch} log sigmoid(r_w - r_l)`, P the number of pairs
    of the whole batch (`pair_count`):
    every comparison weighted equally, so prompts with many completions weigh more (the
    chosen/rejected convention of TRL-style trainers, computed from the same K-wise batch).
    """
    better_BKK, diff_BKK = _pairs(outputs, batch)
    n_pairs = _pair_count(batch, better_BKK)
    loss = -masked_mean(jax.nn.log_sigmoid(diff_BKK), better_BKK, count=n_pairs)
    return LossOut(loss, _metrics(loss, better_BKK, diff_BKK, n_pairs))
