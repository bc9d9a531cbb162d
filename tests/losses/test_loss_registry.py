from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import registry as registry_module
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses import get_loss, ppo_clip, register_loss, registered_losses
from rlhf_jax.types import LossOut

HERE = Path(__file__).parent


def _policy_batch():
    return (
        {"logprobs": jnp.array([[-1.0, -2.0, 40.0]])},
        {
            "old_logprobs": jnp.array([[-1.0, -2.0, 0.0]]),
            "advantages": jnp.array([[1.0, 3.0, 9.0]]),
            "response_mask": jnp.array([[1.0, 1.0, 0.0]]),
        },
    )


def test_defaults_registered_for_every_kind():
    names = registered_losses()
    assert set(names) == {"sft", "reward", "policy", "value", "ptx", "preference"}
    for kind, expected in {
        "sft": "sft_cross_entropy",
        "reward": "kwise_ranking",
        "policy": "ppo_clip",
        "value": "clipped_value",
        "ptx": "pretrain_nll",
    }.items():
        assert "default" in names[kind] and expected in names[kind]
        assert get_loss(kind, "default").func is get_loss(kind, expected).func
    assert "pairwise_mean" in names["reward"] and "unclipped_value" in names["value"]


def test_hparams_are_bound():
    outputs, batch = _policy_batch()
    loose = get_loss("policy", "ppo_clip", clip_eps=10.0)(outputs, batch)
    np.testing.assert_allclose(loose.loss, ppo_clip(outputs, batch, clip_eps=10.0).loss)


def test_custom_loss_outside_the_package(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    fn = get_loss("policy", "custom_loss_module:my_loss", scale=2.0)
    out = fn(*_policy_batch())
    assert isinstance(out, LossOut)
    # -2 * mean(A * logp) over the 2 real tokens = -2 * (1 * -1 + 3 * -2) / 2 = 7
    np.testing.assert_allclose(out.loss, 7.0)


def test_custom_loss_in_a_package_on_tmp_path(tmp_path, monkeypatch):
    pkg = tmp_path / "my_fork_losses"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "value.py").write_text(
        "from rlhf_jax.types import LossOut\n"
        "def huber(outputs, batch, delta=1.0):\n"
        "    return LossOut(outputs['values'].sum() * delta, {})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = get_loss("value", "my_fork_losses.value:huber", delta=3.0)({"values": jnp.ones(2)}, {})
    assert float(out.loss) == 6.0


def test_unknown_name_lists_available():
    with pytest.raises(RlhfJaxError) as e:
        get_loss("reward", "bradley_terry_typo")
    msg = str(e.value)
    assert "reward" in msg and "bradley_terry_typo" in msg
    for name in registered_losses()["reward"]:
        assert name in msg


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("custom_loss_module:missing", "has no function 'missing'"),
        ("custom_loss_module:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
        (":fn", "expected 'package.module:function'"),
    ],
)
def test_unimportable_names(spec, fragment, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(RlhfJaxError, match="available policy losses: cispo, default") as e:
        get_loss("policy", spec)
    assert fragment in str(e.value)


def test_unknown_kind_and_unknown_hparam():
    with pytest.raises(RlhfJaxError, match="kinds: sft, reward, policy, value, ptx"):
        get_loss("critic", "default")
    with pytest.raises(RlhfJaxError, match="clip_epsilon.*clip_eps"):
        get_loss("policy", "ppo_clip", clip_epsilon=0.1)


def test_register_loss_decorator(monkeypatch):
    monkeypatch.setattr(
        registry_module, "_REGISTRY", {k: dict(v) for k, v in registry_module._REGISTRY.items()}
    )

    @register_loss("value", "zero")
    def zero(outputs, batch):
        return LossOut(jnp.zeros(()), {})

    assert "zero" in registered_losses()["value"]
    assert get_loss("value", "zero").func is zero
    with pytest.raises(ValueError, match="already registered"):
        register_loss("value", "zero")(lambda o, b: None)
