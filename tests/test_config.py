"""Config loading: YAML + overrides into typed sections, with errors that name the key."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from rlhf_jax.config import Config, load_config
from rlhf_jax.config.schema import RANGES
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
        ("ppo.minibatch_size=7", "'ppo.minibatch_size': 7 does not divide the 64 responses"),
        ("rm.k=12", "config key 'rm.k' must be in [2, 9], got 12"),
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


def test_a_nested_override_keeps_the_sections_own_defaults(tmp_path):
    """`sft.optim.lr` changes only the learning rate of SFT's optimizer, whose other
    defaults (warmup 10) differ from OptimConfig's; the same from YAML; setting a value to
    its default changes nothing."""
    default = Config()
    cfg = load_config(Config, None, ["sft.optim.lr=1e-4", "ppo.policy_optim.lr=1e-5"])
    assert cfg.sft.optim == dataclasses.replace(default.sft.optim, lr=1e-4)
    assert cfg.ppo.policy_optim == dataclasses.replace(default.ppo.policy_optim, lr=1e-5)
    assert cfg.sft.optim.warmup_steps == 10 and cfg.ppo.policy_optim.schedule == "linear"
    (tmp_path / "c.yaml").write_text("rm:\n  optim:\n    weight_decay: 0.1\n")
    from_yaml = load_config(Config, tmp_path / "c.yaml")
    assert from_yaml.rm.optim == dataclasses.replace(default.rm.optim, weight_decay=0.1)
    assert load_config(Config, None, [f"sft.optim.lr={default.sft.optim.lr}"]) == default


@pytest.mark.parametrize(
    "key,moved_to",
    [
        ("ppo.clip_eps", "ppo.policy_loss_kwargs.clip_eps"),
        ("ppo.value_clip", "ppo.value_loss_kwargs.clip_range"),
        ("ppo.gamma", "ppo.advantage_kwargs.gamma"),
        ("ppo.lam", "ppo.advantage_kwargs.lam"),
        ("ppo.whiten_rewards", "ppo.advantage_kwargs.whiten_rewards"),
    ],
)
def test_moved_keys_say_where_they_went(key, moved_to):
    with pytest.raises(RlhfJaxError, match=f"'{key}' has moved: set '{moved_to}'"):
        load_config(Config, None, [f"{key}=0.1"])


def test_rl_settings_are_checked_together():
    cfg = load_config(Config, None, ["ppo.samples_per_prompt=4", "ppo.rollout_batch=16"])
    assert cfg.ppo.episodes == 64 and cfg.ppo.kl_kind == "k1"
    assert load_config(Config, None, ["ppo.kl_penalty=loss"]).ppo.kl_kind == "k3"
    for override, message in [
        ("ppo.samples_per_prompt=0", "'ppo.samples_per_prompt' must be >= 1"),
        ("ppo.top_p=1.5", "'ppo.top_p' must be in (0, 1]"),
        ("ppo.top_k=0", "'ppo.top_k' must be >= 1"),
        ("eval.n_samples=0", "'eval.n_samples' must be >= 1"),
        ("ppo.top_p=null", None),
    ]:
        if message is None:
            load_config(Config, None, [override])
            continue
        with pytest.raises(RlhfJaxError, match=re.escape(message)):
            load_config(Config, None, [override])
    with pytest.raises(RlhfJaxError, match="the KL controller needs a KL term"):
        load_config(Config, None, ["ppo.kl_penalty=none", "ppo.adaptive_kl=true"])
    with pytest.raises(RlhfJaxError, match=r"does not divide the 192 responses"):
        load_config(Config, None, ["ppo.samples_per_prompt=3", "ppo.minibatch_size=128"])


def _sections(cls, prefix=""):
    """(key prefix, dataclass) of Config and every nested section."""
    yield prefix, cls
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                yield from _sections(type(default), prefix + f.name + ".")


def _numeric_fields():
    for prefix, cls in _sections(Config):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            kinds = [a for a in args if a in (int, float)]
            if kinds:
                yield prefix + f.name, cls.__name__, f.name, kinds[0]


def test_every_numeric_field_has_a_declared_range():
    missing = [key for key, cls, name, _ in _numeric_fields() if name not in RANGES.get(cls, {})]
    assert not missing, f"numeric config fields without a range in schema.RANGES: {missing}"


def _outside(allowed, kind):
    """Values the range refuses: just past each bound, and NaN / inf for floats."""
    bad = []
    if allowed.lo is not None:
        bad.append(allowed.lo if allowed.lo_open else allowed.lo - 1)
    if allowed.hi is not None:
        bad.append(allowed.hi if allowed.hi_open else allowed.hi + 1)
    if kind is float:
        bad += ["nan", "inf"]
    return bad


@pytest.mark.parametrize("key,cls,name,kind", list(_numeric_fields()), ids=lambda x: str(x))
def test_values_outside_a_fields_range_name_the_key(key, cls, name, kind):
    allowed = RANGES[cls][name]
    for value in _outside(allowed, kind):
        value = kind(value) if kind is int else value
        with pytest.raises(RlhfJaxError, match=re.escape(f"config key '{key}' must be")):
            load_config(Config, None, [f"{key}={value}"])


def test_an_empty_yaml_section_keeps_its_defaults_and_takes_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("ppo:\nsft:\n  steps: 3\n")
    cfg = load_config(Config, tmp_path / "c.yaml", ["ppo.beta=0.1"])
    assert cfg.ppo.beta == 0.1 and cfg.sft.steps == 3
    assert cfg.ppo.epochs == Config().ppo.epochs


def test_a_config_folder_is_not_a_file(tmp_path):
    with pytest.raises(RlhfJaxError, match="is a folder; --config takes a YAML file"):
        load_config(Config, tmp_path)
