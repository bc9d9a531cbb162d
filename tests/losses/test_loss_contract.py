"""The contract every registered part keeps, whatever its math (`rlhf_jax.contract`, the same
checker a fork runs on its own loss or estimator)."""

import jax.numpy as jnp
import pytest

from rlhf_jax import registry
from rlhf_jax.contract import check_part
from rlhf_jax.types import LossOut

ALL = [(kind, name) for kind, names in registry.registered().items() for name in names]


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_registered_part_keeps_the_contract(kind, name):
    check_part(kind, registry.lookup(kind, name))


def test_every_registered_part_declares_what_it_reads():
    for kind, name in ALL:
        if kind != "reward_fn":  # (text in, numbers out: no batch keys)
            assert "reads" in registry.info(registry.lookup(kind, name)), (kind, name)


def test_the_checker_catches_a_loss_that_leaks_into_padding():
    def leaky(outputs, batch):
        loss = -jnp.mean(outputs["logprobs"])  # padding included
        return LossOut(loss, {"leaky/loss": loss})

    with pytest.raises(AssertionError):
        check_part("policy", leaky)


def test_the_checker_catches_an_undeclared_read():
    @registry.declare(reads=("advantages", "response_mask"))
    def sneaky(outputs, batch):
        m = batch["response_mask"]
        x = outputs["logprobs"] * batch["advantages"] * jnp.exp(batch["ref_logprobs"])
        loss = jnp.sum(x * m) / jnp.sum(m)
        return LossOut(loss, {"sneaky/loss": loss})

    with pytest.raises(AssertionError, match="ref_logprobs"):
        check_part("policy", sneaky)


def test_the_checker_catches_an_estimator_without_returns_for_its_critic():
    from rlhf_jax.advantages import AdvantageOut

    @registry.declare(needs_critic=True)
    def no_returns(batch):
        return AdvantageOut(batch["rewards"] * batch["response_mask"], None, {})

    with pytest.raises(AssertionError, match="returns"):
        check_part("advantage", no_returns)
