"""Gradient accumulation is exact for every registered loss: the step hands each micro-batch
the whole batch's counts (`losses.accumulation`) and sums the results, so `grad_accum` 1, 2 and
4 give the same loss, metrics and update on micro-batches of unequal counts (3 and 17 target
tokens, 12 and 2 ranked pairs, 11 and 3 response tokens: `contract.sample_inputs`).

The step is the real `make_supervised_step` (the real scan and sum of `accumulate_gradients`)
around each registered loss, with the model replaced by trainable offsets added to fixed
outputs, so every loss is walked without compiling a transformer per loss; the transformer
steps themselves are checked in test_steps.py and test_rl.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import registry
from rlhf_jax.contract import sample_inputs
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.steps import TrainState
from rlhf_jax.steps.state import make_supervised_step

LOSSES = [(k, n) for k in registry.LOSS_KINDS for n in registry.registered(k)]
# Variants chosen by a hyperparameter rather than a name.
LOSSES += [("preference", "dpo:pair"), ("policy", "ppo_clip:seq_mean_token_mean")]
LOSSES += [("policy", "ppo_clip:seq_mean_token_sum_norm")]


def resolve(kind, spec):
    name, _, variant = spec.partition(":")
    hparams = {"beta": 0.5} if kind == "preference" else {}
    if variant == "pair":
        hparams["weighting"] = "pair"
    elif variant:
        hparams["reduction"] = variant
    return registry.resolve(kind, name, **hparams)


def one_step(kind, loss_fn, grad_accum):
    """One SGD step (lr 1: the change is minus the gradient) of offsets added to the sample
    outputs, rows split into `grad_accum` micro-batches by the real step."""
    outputs, batch, _ = sample_inputs(kind)
    rows = np.shape(next(iter(outputs.values())))[0]
    per_row = {k: v for k, v in batch.items() if np.ndim(v) and np.shape(v)[0] == rows}
    scalars = {k: v for k, v in batch.items() if k not in per_row}
    step_batch = {**per_row, "_row": np.arange(rows)}
    step_batch |= {f"_out/{k}": v for k, v in outputs.items()}
    rng = np.random.default_rng(1)
    offsets = {k: jnp.asarray(0.1 * rng.normal(size=np.shape(v)), jnp.float32)
               for k, v in outputs.items()}  # fmt: skip

    def compute_loss(params, mb):
        out = {k: mb[f"_out/{k}"] + params[k][mb["_row"]] for k in outputs}
        loss_batch = {k: v for k, v in mb.items() if not k.startswith("_")} | scalars
        result = loss_fn(out, loss_batch)
        return result.loss, result.metrics

    counts_fn = functools.partial(batch_counts, kind, loss_fn)
    step = jax.jit(make_supervised_step(compute_loss, grad_accum, counts_fn))
    state, metrics = step(TrainState.create(offsets, optax.sgd(1.0)), step_batch, None)
    return jax.tree.map(jnp.subtract, state.params, offsets), metrics


@pytest.mark.parametrize("kind,spec", LOSSES, ids=[f"{k}-{n}" for k, n in LOSSES])
def test_every_registered_loss_is_exact_under_accumulation(kind, spec):
    loss_fn = resolve(kind, spec)
    want_update, want = one_step(kind, loss_fn, 1)
    assert any(float(jnp.max(jnp.abs(u))) > 1e-4 for u in jax.tree.leaves(want_update))
    for grad_accum in (2, 4):
        update, got = one_step(kind, loss_fn, grad_accum)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        for key in want_update:
            np.testing.assert_allclose(
                update[key], want_update[key], rtol=1e-5, atol=1e-6, err_msg=key
            )
