"""Ranges on the hyperparameters of parts: every numeric hyperparameter of every built-in part
declares the values it accepts, and a value outside them fails when the config is loaded, in
one line naming the part and the hyperparameter (not as NaN updates later)."""

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import registry
from rlhf_jax.advantages import grpo
from rlhf_jax.cli import main
from rlhf_jax.config import Config, load_config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.steps import resolve_config_parts


def _builtin_parts():
    for kind, names in registry.registered().items():
        for name in names:
            fn = registry.lookup(kind, name)
            if fn.__module__.startswith("rlhf_jax."):
                yield kind, name, fn


def test_every_numeric_hyperparameter_of_a_builtin_part_declares_a_range():
    missing, outside = [], []
    for kind, name, fn in _builtin_parts():
        ranges = registry.info(fn).get("ranges", {})
        params = list(inspect.signature(fn).parameters.values())[registry._N_INPUTS[kind] :]
        for p in params:
            numeric = isinstance(p.default, int | float) and not isinstance(p.default, bool)
            numeric |= p.annotation in ("float", "float | None", "int")
            if numeric and p.name not in ranges:
                missing.append(f"{kind} {name}: {p.name}")
            has_default = isinstance(p.default, int | float)
            if p.name in ranges and has_default and not ranges[p.name].contains(p.default):
                outside.append(f"{kind} {name}: {p.name}={p.default}")
    assert not missing, f"numeric hyperparameters without a declared range: {missing}"
    assert not outside, f"defaults outside their own range: {outside}"


def _resolve(*overrides):
    return resolve_config_parts(load_config(Config, None, list(overrides)))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.advantage_kwargs.eps=0"],
            "advantage estimator 'grpo': hyperparameter 'eps' must be > 0, got 0",
        ),
        (
            ["ppo.advantage_kwargs.lam=1.5"],
            "advantage estimator 'gae': hyperparameter 'lam' must be in [0, 1], got 1.5",
        ),
        (
            ["ppo.policy_loss_kwargs.clip_eps=0"],
            "policy loss 'default': hyperparameter 'clip_eps' must be > 0, got 0",
        ),
        (
            ["ppo.policy_loss=ppo_dual_clip", "ppo.policy_loss_kwargs.dual_clip=0.5"],
            "policy loss 'ppo_dual_clip': hyperparameter 'dual_clip' must be > 1, got 0.5",
        ),
        (
            ["ppo.value_loss_kwargs.clip_range=-0.2"],
            "value loss 'default': hyperparameter 'clip_range' must be > 0, got -0.2",
        ),
        (
            ["ppo.advantage_kwargs.gamma=.nan"],
            "advantage estimator 'gae': hyperparameter 'gamma' must be in [0, 1], got nan",
        ),
        (
            ["ppo.advantage_kwargs.gamma=high"],
            "hyperparameter 'gamma' must be a number in [0, 1], got 'high'",
        ),
        (
            ["dpo.loss=robust_dpo", "dpo.loss_kwargs.label_smoothing=0.5"],
            "preference loss 'robust_dpo': hyperparameter 'label_smoothing' must be in "
            "[0, 0.5), got 0.5",
        ),
    ],
)
def test_a_hyperparameter_outside_its_range_fails_at_config_load(overrides, message):
    with pytest.raises(RlhfJaxError) as e:
        _resolve(*overrides)
    assert message in str(e.value)


def test_the_cli_refuses_it_in_one_line_before_any_output(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "pipeline",
            "--output",
            str(out),
            "ppo.advantage=grpo",
            "ppo.samples_per_prompt=2",
            "ppo.advantage_kwargs.eps=0",
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err == "error: advantage estimator 'grpo': hyperparameter 'eps' must be > 0, got 0\n"
    assert not out.exists()


def test_grpo_eps_is_what_keeps_a_group_that_agrees_finite():
    """Why the range: with eps = 0 a group whose returns all agree divides 0 by 0."""
    batch = {
        "rewards": jnp.array([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]),
        "response_mask": jnp.ones((4, 2)),
        "scores": jnp.array([1.0, 1.0, 2.0, 3.0]),
        "group_ids": jnp.array([0, 0, 1, 1]),
    }
    assert np.isnan(np.asarray(grpo(batch, eps=0.0).advantages[:2])).all()
    np.testing.assert_array_equal(grpo(batch).advantages[:2], 0.0)  # the default eps


def test_a_fork_declares_ranges_for_its_own_part(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "advantage", dict(registry._REGISTRY["advantage"]))
    from rlhf_jax.advantages import register_advantage
    from rlhf_jax.config.schema import POSITIVE

    @register_advantage("my_scaled", ranges={"scale": POSITIVE})
    def my_scaled(batch, scale: float = 1.0):
        raise AssertionError("not called")

    with pytest.raises(RlhfJaxError, match="'my_scaled': hyperparameter 'scale' must be > 0"):
        registry.resolve("advantage", "my_scaled", scale=0.0)
    registry.resolve("advantage", "my_scaled", scale=2.0)
