"""Losses that misbehave on purpose, loaded by the fault tests as `faulty_losses:<name>`."""

import jax.numpy as jnp

from rlhf_jax.types import LossOut


def always_nan(outputs, batch):
    """NaN for every batch (gradients are NaN too): every update must be skipped."""
    loss = jnp.nan * jnp.mean(outputs["logits"])
    return LossOut(loss, {"sft/loss": loss})


def nan_policy(outputs, batch):
    """A PPO policy loss that is NaN (its gradient too); the value loss stays finite."""
    loss = jnp.nan * jnp.mean(outputs["logprobs"])
    return LossOut(loss, {"ppo/policy/loss": loss})


def nan_preference(outputs, batch, beta):
    """A preference loss that is NaN for every batch (with the accuracy the stage reads back,
    which the contract requires: the NaN is what the test is about)."""
    loss = jnp.nan * jnp.mean(outputs["logps"]) * beta
    return LossOut(loss, {"dpo/loss": loss, "dpo/accuracy": loss})
