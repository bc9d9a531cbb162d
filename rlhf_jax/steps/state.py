"""Training state pytrees and gradient accumulation shared by every step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax.losses.accumulation import combine_metrics, micro_batches
from rlhf_jax.metrics import merged_metrics
from rlhf_jax.models.lora import merge_trees


class TrainState(struct.PyTreeNode):
    """Parameters, optimizer state and the number of optimizer updates taken.

    `frozen`: weights the model reads but the optimizer never sees (LoRA's base weights,
    `models.lora`), or None. The model's whole tree is `model_params`: `params` and `frozen`
    joined. Checkpoints leave `frozen` out: it is reloaded from its model folder.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    frozen: Any = None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, frozen: Any = None) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            tx=tx,
            frozen=frozen,
        )

    @property
    def model_params(self):
        """The weights a forward pass takes: the trained ones joined with the frozen ones."""
        return self.with_trained(self.params)

    def with_trained(self, params):
        """`params` (the trained part, e.g. inside a gradient) joined with the frozen part."""
        return merge_trees(self.frozen, params)

    def apply_gradients(self, grads) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
        )


def _is_train_state(x) -> bool:
    return isinstance(x, TrainState)


def without_frozen(tree):
    """`tree` (a state, or its shardings) with every TrainState's frozen weights left out:
    what a checkpoint holds."""
    return jax.tree.map(
        lambda x: x.replace(frozen=None) if _is_train_state(x) else x, tree, is_leaf=_is_train_state
    )


def with_frozen_of(tree, like):
    """`tree` (e.g. restored from a checkpoint) with the frozen weights of `like` put back."""
    return jax.tree.map(
        lambda x, y: x.replace(frozen=y.frozen) if _is_train_state(x) else x,
        tree,
        like,
        is_leaf=_is_train_state,
    )


def skip_metrics(state: TrainState, prefix: str = "train") -> dict[str, jax.Array]:
    """Updates skipped for non-finite gradients or updates (`optim.skip_non_finite`): in all,
    and in a row up to now (the loops stop a run when the latter reaches
    `max_consecutive_skips`)."""
    opt = state.opt_state
    if not hasattr(opt, "notfinite_count"):
        zero = jnp.zeros((), jnp.float32)
        return {f"{prefix}/skipped_updates": zero, f"{prefix}/consecutive_skips": zero}
    return {
        f"{prefix}/skipped_updates": opt.total_notfinite.astype(jnp.float32),
        f"{prefix}/consecutive_skips": opt.notfinite_count.astype(jnp.float32),
    }


def accumulate_gradients(
    loss_fn: Callable[[Any, dict], tuple[jax.Array, dict]],
    params,
    batch: dict,
    n_micro: int,
):
    """Loss, gradients and metrics summed over `n_micro` equal slices of the batch (metrics
    named `*_max` take the maximum instead).

    The sum is the whole batch's loss and gradient when `loss_fn` divides by the WHOLE batch's
    counts (`losses.accumulation`: the steps compute them before calling this and close
    `loss_fn` over them), whatever the number of tokens or pairs in each slice. The slices
    (rows j, j + n, ...: `accumulation.micro_batches`) run in a `lax.scan`, so memory is that
    of one micro-batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(mb):
        (loss, metrics), grads = grad_fn(params, mb)
        return loss, grads, metrics

    if n_micro == 1:
        return micro_step(batch)
    micro = micro_batches(batch, n_micro)
    shapes = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, mb):
        loss, grads, metrics = micro_step(mb)
        acc_loss, acc_grads, acc_metrics = acc
        metrics = combine_metrics(acc_metrics, metrics)
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads), metrics), None

    (loss, grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    return loss, grads, metrics


def make_supervised_step(
    compute_loss: Callable[[Any, dict], tuple[jax.Array, dict]],
    grad_accum: int,
    counts_fn: Callable[[dict], dict],
) -> Callable:
    """`step(state, batch, key) -> (state, metrics)` for a loss of (params, batch): one
    optimizer update per call, over `grad_accum` micro-batches. `counts_fn(batch)` gives the
    whole batch's normalisers (`accumulation.batch_counts`), computed before the batch is
    split and added to every micro-batch."""

    def step(state: TrainState, batch: dict, key: jax.Array):
        del key  # dropout is off in every model (N-implementation-details), nothing to sample
        counts = counts_fn(batch)

        def loss_of_trained(params, mb):  # gradients for the trained weights only
            return compute_loss(state.with_trained(params), {**mb, **counts})

        _, grads, metrics = accumulate_gradients(loss_of_trained, state.params, batch, grad_accum)
        state = state.apply_gradients(grads)
        library = {"train/grad_norm": optax.tree.norm(grads), **skip_metrics(state)}
        return state, merged_metrics(("the loss", metrics), ("the train step itself", library))

    return step
