"""Config loading: YAML + overrides into typed sections, with errors that name the key."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from rlhf_jax.config import Config, compare_runs, load_config
from rlhf_jax.config.schema import PATHS, RANGES
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
        ("seed=4294967296", "config key 'seed' must be in [0, 4294967295], got 4294967296"),
        ("ppo.adaptive_kl=3", "config key 'ppo.adaptive_kl': expected true or false"),
        ("model.family=bert", "'bert' is not one of"),
        ("ppo.buckets_per_doubling=3", "'ppo.buckets_per_doubling': 3 is not one of [1, 2, 4, 8]"),
        ("ppo.buckets_per_doubling=true", "True is not one of [1, 2, 4, 8]"),  # True == 1
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


def test_a_key_set_twice_in_yaml_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the second of two equal keys and drops the first silently: a section, a
    key or a compare row written twice is refused, naming the file and both lines."""
    cases = {
        "section.yaml": ("ppo:\n  beta: 0.1\nsft:\n  steps: 3\nppo:\n  epochs: 1\n", 5, 1, "ppo"),
        "key.yaml": ("sft:\n  steps: 3\n  batch_size: 8\n  steps: 4\n", 4, 2, "steps"),
        "row.yaml": (
            "compare:\n  algorithms:\n    g: {advantage: grpo}\n    g: {advantage: rloo}\n",
            4,
            3,
            "g",
        ),
    }
    for name, (text, again, first, key) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(RlhfJaxError) as e:
            load_config(Config, tmp_path / name)
        assert str(e.value).startswith(
            f"{tmp_path / name}:{again}: key '{key}' is set twice in the same mapping (first "
            f"at line {first})"
        ), str(e.value)
    # YAML merge keys (`<<: *anchor`) repeat keys on purpose and still work
    (tmp_path / "merge.yaml").write_text(
        "base: &b {steps: 3, batch_size: 8}\nsft:\n  <<: *b\n  steps: 5\n".replace("base", "x")
    )
    with pytest.raises(RlhfJaxError, match="'x' is unknown"):  # only the unknown key fails
        load_config(Config, tmp_path / "merge.yaml")


def test_dotted_keys_in_yaml_mean_what_the_same_override_means(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "ppo.beta: 0.2\nsft.optim.lr: 0.01\nppo:\n  iterations: 3\n"
        "compare:\n  algorithms:\n    g: {advantage: grpo, policy_loss_kwargs.clip_eps: 0.3}\n"
    )
    cfg = load_config(Config, tmp_path / "c.yaml")
    assert (cfg.ppo.beta, cfg.ppo.iterations, cfg.sft.optim.lr) == (0.2, 3, 0.01)
    assert cfg.sft.optim.warmup_steps == Config().sft.optim.warmup_steps  # SFT's own default
    assert cfg.compare.algorithms["g"] == {
        "advantage": "grpo",
        "policy_loss_kwargs": {"clip_eps": 0.3},
    }
    assert load_config(Config, tmp_path / "c.yaml", ["ppo.beta=0.5"]).ppo.beta == 0.5
    (tmp_path / "twice.yaml").write_text("ppo.beta: 0.2\nppo:\n  beta: 0.3\n")
    with pytest.raises(RlhfJaxError, match=r"twice.yaml: config key 'ppo.beta' is set twice"):
        load_config(Config, tmp_path / "twice.yaml")
    (tmp_path / "typo.yaml").write_text("ppo.betta: 0.2\n")
    with pytest.raises(RlhfJaxError, match=r"'ppo.betta' is unknown; did you mean 'ppo.beta'"):
        load_config(Config, tmp_path / "typo.yaml")


def test_paths_expand_home_and_an_empty_one_names_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("sft:\n  data: ~/demos.jsonl\n")
    assert load_config(Config, tmp_path / "c.yaml").sft.data == str(tmp_path / "demos.jsonl")
    assert load_config(Config, None, ["ppo.policy=~/sft"]).ppo.policy == str(tmp_path / "sft")
    sections = {
        type(getattr(Config(), f.name)).__name__: f.name for f in dataclasses.fields(Config)
    }
    assert set(PATHS) <= set(sections)
    for cls_name, names in PATHS.items():
        for name in names:
            key = f"{sections[cls_name]}.{name}"
            with pytest.raises(
                RlhfJaxError, match=re.escape(f"config key '{key}' is an empty path")
            ):
                load_config(Config, None, [f"{key}="])
    (tmp_path / "blank.yaml").write_text('ppo:\n  prompts: "  "\n')
    with pytest.raises(RlhfJaxError, match="blank.yaml: config key 'ppo.prompts' is an empty"):
        load_config(Config, tmp_path / "blank.yaml")
    with pytest.raises(
        RlhfJaxError, match=re.escape("'compare.algorithms.g.prompts' is an empty path")
    ):
        compare_runs(load_config(Config, None, ["compare.algorithms={g: {prompts: ''}}"]))


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            "compare.algorithms={ppo: {}, ppo_gold: {}}",
            "'ppo_gold' is also the gold-reward twin of compare.algorithms.ppo",
        ),
        (
            "compare.algorithms={ppo_gold: {}, ppo: {}}",
            "'ppo_gold' is also the gold-reward twin of compare.algorithms.ppo",
        ),
        ("compare.algorithms={x: {}}", "'x' is also compare.preference.x"),
        ("compare.algorithms={'../up': {}}", "row name '../up' is not a plain folder name"),
        ("compare.algorithms={'a/b': {}}", "row name 'a/b' is not a plain folder name"),
        ("compare.algorithms={'.hidden': {}}", "row name '.hidden' is not a plain folder name"),
        ("compare.algorithms={'': {}}", "row name '' is not a plain folder name"),
    ],
)
def test_compare_row_names_are_plain_and_unique_across_every_map(rows, message):
    """A row's name is a folder (OUT/policies/<name>), a checkpoint stage and a report row:
    a name that escapes the output folder, or that two rows share (a user's row and a gold
    twin, an algorithm and a preference run) is refused when the config loads."""
    with pytest.raises(RlhfJaxError, match=re.escape(message)):
        load_config(Config, None, [rows, "compare.preference={x: {}}"])


def test_gold_twins_are_only_reserved_when_compare_adds_them():
    cfg = load_config(
        Config, None, ["compare.algorithms={ppo: {}, ppo_gold: {}}", "compare.reward_fn=null"]
    )
    assert set(compare_runs(cfg)) == {"ppo", "ppo_gold"}
