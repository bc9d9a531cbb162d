"""How every loss stays exact under gradient accumulation and data parallelism: one mechanism.

A step that accumulates `n` micro-batches (or a fork's notebook) does this:

  1. `counts = batch_counts(kind, loss_fn, batch)` on the WHOLE batch, before splitting it:
     the normalisers of the loss's kind (table below) plus any the loss declares itself with
     `@declare(counts=fn)`, `fn(batch) -> {name: scalar}`. Under jit these sums run over the
     global batch, so with data-parallel shards they are global too (nothing per device).
  2. each micro-batch (`micro_batches`) is handed to the loss with those counts added
     (`{**micro, **counts}`), and the loss divides its sums by them, never by a count of its own
     micro-batch: its value is then the micro-batch's share of the whole batch's loss;
  3. the shares are summed (`combine_metrics`), loss, gradient and every metric alike, except
     metrics named `*_max`, whose maximum is taken.

A mean of per-micro-batch means is not the batch's mean when micro-batches hold different
numbers of tokens or pairs (3 and 17 target tokens: 43% off); the sum of shares is, exactly.
A loss called alone (a test, an evaluation over all of its arrays) falls back to the counts of
the batch it is given, which are the same numbers.

The counts each kind receives (whole batch), with the masks that define them stated here once:

  kind                 key              what it counts
  sft                  token_count      target tokens (`loss_mask`, shifted as the targets are)
                       sequence_count   rows with at least one target token
  ptx                  token_count      scored tokens (target and its context both real)
                       sequence_count   rows with at least one scored token
  reward, preference   pair_count       ranked pairs (i above j, both real; ties are no pair)
                       prompt_count     prompts with at least one ranked pair
  policy, value        token_count      response tokens (`response_mask`)
                       sequence_count   rows (responses), empty or not
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from rlhf_jax import registry

Arrays = Mapping[str, jax.Array]


def sft_target_mask(batch: Arrays) -> jax.Array:
    """[B, T - 1]: loss_mask[b, t] marks input_ids[b, t] as a target; the logits at t - 1 score
    it, so the mask is shifted left by one with the tokens."""
    return jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]


def ptx_target_mask(batch: Arrays) -> jax.Array:
    """[B, T - 1]: token t + 1 is scored when it and its context token t are both real (with
    left padding the first real token has no real context to score it)."""
    attn_BT = jnp.asarray(batch["attention_mask"], jnp.float32)
    return attn_BT[:, :-1] * attn_BT[:, 1:]


def ranked_pairs(batch: Arrays) -> jax.Array:
    """[B, K, K] float: 1 where completion i is ranked strictly above j (rank 0 is best) and
    both are real (`completion_mask`); equal ranks are ties, not comparisons."""
    real_BK = jnp.asarray(batch["completion_mask"]) != 0
    rank_BK = jnp.asarray(batch["rank"])
    both_BKK = real_BK[:, :, None] & real_BK[:, None, :]
    return (both_BKK & (rank_BK[:, :, None] < rank_BK[:, None, :])).astype(jnp.float32)


def _tokens_and_rows(mask_BT: jax.Array) -> dict[str, jax.Array]:
    return {
        "token_count": jnp.sum(mask_BT),
        "sequence_count": jnp.sum((jnp.sum(mask_BT, axis=1) > 0).astype(jnp.float32)),
    }


def _pairs_and_prompts(batch: Arrays) -> dict[str, jax.Array]:
    pairs_B = jnp.sum(ranked_pairs(batch), axis=(1, 2))
    return {
        "pair_count": jnp.sum(pairs_B),
        "prompt_count": jnp.sum((pairs_B > 0).astype(jnp.float32)),
    }


def _responses(batch: Arrays) -> dict[str, jax.Array]:
    mask_BT = jnp.asarray(batch["response_mask"], jnp.float32)
    return {
        "token_count": jnp.sum(mask_BT),
        "sequence_count": jnp.asarray(mask_BT.shape[0], jnp.float32),
    }


KIND_COUNTS: dict[str, Callable[[Arrays], dict[str, jax.Array]]] = {
    "sft": lambda batch: _tokens_and_rows(sft_target_mask(batch)),
    "ptx": lambda batch: _tokens_and_rows(ptx_target_mask(batch)),
    "reward": _pairs_and_prompts,
    "preference": _pairs_and_prompts,
    "policy": _responses,
    "value": _responses,
}
# The keys of each kind's counts, for the lists of batch keys a loss may read.
KIND_COUNT_KEYS = {
    kind: ("pair_count", "prompt_count")
    if kind in ("reward", "preference")
    else ("token_count", "sequence_count")
    for kind in KIND_COUNTS
}


def batch_counts(kind: str, loss_fn: Callable | None, batch: Arrays) -> dict[str, jax.Array]:
    """The whole batch's normalisers for `loss_fn` of `kind`: the kind's counts, plus those
    it declares with `@declare(counts=fn)` (`fn(batch) -> {name: scalar}`)."""
    counts = dict(KIND_COUNTS[kind](batch))
    declared = registry.info(loss_fn).get("counts") if loss_fn is not None else None
    if declared is not None:
        counts.update({k: jnp.asarray(v, jnp.float32) for k, v in declared(batch).items()})
    return counts


def count_or_local(batch: Arrays, key: str, local: jax.Array) -> jax.Array:
    """`batch[key]` (the whole batch's count, given by the step) or else `local`, the count of
    the batch at hand (a loss called alone)."""
    return batch.get(key, local)


def micro_batches(tree, n: int):
    """Every leaf [B, ...] -> [n, B / n, ...]: micro-batch j holds rows j, j + n, j + 2n, ...
    A strided split keeps every device's rows on that device when the batch is sharded along
    its rows (a contiguous split would move them)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def combine_metrics(acc: Mapping[str, jax.Array], new: Mapping[str, jax.Array]) -> dict:
    """Accumulate one micro-batch's metrics: shares add up; `*_max` metrics take the max."""
    return {k: jnp.maximum(acc[k], v) if k.endswith("_max") else acc[k] + v for k, v in new.items()}
