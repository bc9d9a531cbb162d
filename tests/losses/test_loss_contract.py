"""The contract every registered part keeps, whatever its math (`rlhf_jax.contract`, the same
checker a fork runs on its own loss or estimator)."""

from pathlib import Path

import jax.numpy as jnp
import pytest

from rlhf_jax import registry
from rlhf_jax.config import Config, load_config
from rlhf_jax.contract import check_part
from rlhf_jax.ops import masked_mean, next_token_logprobs
from rlhf_jax.steps import resolve_config_parts
from rlhf_jax.types import LossOut

HERE = Path(__file__).parent

ALL = [(kind, name) for kind, names in registry.registered().items() for name in names]


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_registered_part_keeps_the_contract(kind, name):
    # A part with a required hyperparameter is checked as a config would bind it.
    hparams = REQUIRED_HPARAMS.get((kind, name), {})
    fn = registry.resolve(kind, name, **hparams) if hparams else registry.lookup(kind, name)
    check_part(kind, fn)


REQUIRED_HPARAMS = {
    ("reward_fn", "weighted"): {"parts": [{"name": "gsm8k_lenient", "weight": 1.0}]},
}


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


def test_the_checker_catches_a_loss_that_averages_its_own_micro_batch():
    """sft_cross_entropy as it was: a mean over the tokens it is given (3 or 17 of them)."""

    def local_mean(outputs, batch):
        logp = next_token_logprobs(outputs["logits"], batch["input_ids"])
        loss = -masked_mean(logp, jnp.asarray(batch["loss_mask"])[:, 1:])
        return LossOut(loss, {"sft/loss": loss})

    with pytest.raises(AssertionError, match=r"token_count 17, 3\) is \d+\.\d% off"):
        check_part("sft", local_mean)


def test_a_declared_normaliser_is_computed_on_the_whole_batch():
    """A fork's loss normalised by a count of its own (tokens with a positive advantage),
    declared with `counts=`, is exact: the step gives it the whole batch's count."""

    def positive_tokens(batch):
        return {"positive_count": jnp.sum(batch["response_mask"] * (batch["advantages"] > 0))}

    @registry.declare(
        reads=("advantages", "response_mask", "positive_count"), counts=positive_tokens
    )
    def positive_only(outputs, batch):
        m = batch["response_mask"] * (batch["advantages"] > 0)
        logp = jnp.where(m != 0, outputs["logprobs"], 0.0)
        loss = -jnp.sum(batch["advantages"] * logp * m) / batch["positive_count"]
        return LossOut(loss, {"fork/loss": loss})

    check_part("policy", positive_only)

    undeclared = registry.declare(reads=("advantages", "response_mask"))(
        lambda outputs, batch: positive_only(
            outputs,
            {k: batch[k] for k in ("advantages", "response_mask")} | positive_tokens(batch),
        )
    )
    with pytest.raises(AssertionError, match="off the whole batch's"):
        check_part("policy", undeclared)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["ppo.policy_loss=custom_loss_module:my_loss", "ppo.policy_optim.grad_accum=2"],
         "ppo.policy_optim.grad_accum"),
        (["sft.loss=custom_loss_module:local_sft", "sft.optim.grad_accum=4"],
         "sft.optim.grad_accum"),
    ],
)  # fmt: skip
def test_a_fork_loss_not_exact_under_accumulation_fails_when_the_config_loads(
    overrides, key, monkeypatch, tmp_path, capsys
):
    from rlhf_jax.cli import main

    monkeypatch.syspath_prepend(str(HERE))
    code = main(["pipeline", "--output", str(tmp_path / "out"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is not exact under gradient accumulation" in err and f"or set {key}=1" in err
    assert not (tmp_path / "out").exists()
    # The same loss without accumulation is fine (nothing is split).
    cfg = load_config(Config, None, [*overrides[:1]])
    resolve_config_parts(cfg)
