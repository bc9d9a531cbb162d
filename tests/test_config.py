"""Config loading: YAML + overrides into typed sections, with errors that name the key."""

from pathlib import Path

import pytest

from rlhf_jax.config import Config, load_config
from rlhf_jax.errors import RlhfJaxError

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(Config, path)
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = load_config(
        Config,
        None,
        [
            "ppo.beta=0.1",
            "sft.optim.lr=1e-4",
            "ppo.adaptive_kl=true",
            "ppo.missing_eos_penalty=null",
            "seed=3",
        ],
    )
    assert cfg.ppo.beta == 0.1 and cfg.sft.optim.lr == 1e-4 and cfg.ppo.adaptive_kl is True
    assert cfg.ppo.missing_eos_penalty is None and cfg.seed == 3
    assert isinstance(cfg.ppo.beta, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("ppo.betta=1", "config key 'ppo.betta' is unknown; did you mean 'ppo.beta'?"),
        ("sft.optim.lrr=3", "did you mean 'sft.optim.lr'?"),
        ("ppo.beta=abc", "config key 'ppo.beta': expected a number, got 'abc'"),
        ("seed=1.5", "config key 'seed': expected an integer"),
        ("ppo.adaptive_kl=3", "config key 'ppo.adaptive_kl': expected true or false"),
        ("model.family=bert", "'bert' is not one of"),
        ("ppo.minibatch_size=7", "'ppo.minibatch_size': 7 does not divide"),
        ("rm.k=12", "'rm.k': 12 is outside 2..9"),
        ("sft.optim.grad_accum=5", "'sft.optim.grad_accum' (5) must be >= 1 and divide"),
        ("ppo", "not of the form key=value"),
        ("ppo.beta.x=1", "config key 'ppo.beta': expected a number"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(RlhfJaxError) as e:
        load_config(Config, None, [override])
    assert message in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nppo:\n  beta: [unclosed\n")
    with pytest.raises(RlhfJaxError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(Config, bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("ppo:\n  betta: 0.1\n")
    with pytest.raises(RlhfJaxError, match=r"typo.yaml: config key 'ppo.betta' is unknown"):
        load_config(Config, typo)
    with pytest.raises(RlhfJaxError, match="config file not found"):
        load_config(Config, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RlhfJaxError, match="top level must be a mapping"):
        load_config(Config, tmp_path / "list.yaml")
