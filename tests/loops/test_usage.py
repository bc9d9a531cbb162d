"""No setting is accepted that the command then ignores: every field of each command's own
sections, set on its own, is either read by that command (the tables below, from reading
the code) or refused before anything runs, naming the key."""

import dataclasses
import typing

import pytest

from rlhf_jax.cli import main
from rlhf_jax.config import Config, load_config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.usage import NOT_OWNED, SECTIONS, refuse_unread, unread_settings

RUNTIME = ("log.every", "log.tensorboard", "log.wandb", "log.progress", "checkpoint", "mesh",
           "distributed")  # fmt: skip
LOADED = (
    "model.path",
    "model.dtype",
    "model.param_dtype",
    "model.remat",
    "model.attention",
    "model.logits_chunk",
)
# What each command reads at the defaults, from reading it: run_sft, run_rm, run_ppo, run_dpo
# (loops/commands.py), the foundation + RL + evaluation (pipeline, compare).
READS = {
    "sft": ("seed", *LOADED, "data", "sft", "lora.rank", *RUNTIME),
    "rm": (
        "seed",
        *(k for k in LOADED if k != "model.logits_chunk"),  # no LM head
        "data",
        *(
            f"rm.{k}"
            for k in (
                "data",
                "init",
                "allow_ties",
                "steps",
                "batch_size",
                "max_prompt_len",
                "max_completion_len",
                "pack",
                "heldout_fraction",
                "optim",
                "loss",
                "loss_kwargs",
            )
        ),
        "sft.data",
        "lora.rank",
        *RUNTIME,
    ),  # fmt: skip
    "ppo": (
        "seed",
        *LOADED,
        "model.frozen_dtype",
        "data",
        "ptx",
        "lora.rank",
        *RUNTIME,
        *(
            f"ppo.{f.name}"
            for f in dataclasses.fields(Config().ppo)
            if f.name not in ("reward_fn_kwargs", "kl_target", "kl_horizon", "rollout_max_rounds")
        ),
    ),  # fmt: skip
    "dpo": ("seed", *LOADED, "data", "dpo", "rm.data", "lora.rank", *RUNTIME),
}
_TASK = tuple(
    f"task.{f.name}" for f in dataclasses.fields(Config().task) if f.name != "short_fraction"
)
_FOUNDATION = ("seed", "model", *_TASK, "data", "pretrain", "sft", "ptx", "eval", "lora.rank",
               *RUNTIME, *(f"rm.{f.name}" for f in dataclasses.fields(Config().rm)
                           if f.name != "init"))  # fmt: skip
_PPO_BASE = tuple(
    f"ppo.{f.name}"
    for f in dataclasses.fields(Config().ppo)
    if f.name
    not in ("policy", "reward_model", "reward_fn_kwargs", "kl_target", "kl_horizon",
            "rollout_max_rounds")
)  # fmt: skip
READS["pipeline"] = (*_FOUNDATION, *_PPO_BASE)
READS["compare"] = (
    *(k for k in _FOUNDATION if k != "eval"), "eval.n_samples", "eval.temperature",
    "eval.bootstrap", *_PPO_BASE, "ppo.kl_target", "ppo.kl_horizon", "ppo.reward_fn_kwargs",
    "ppo.rollout_max_rounds",
    *(f"dpo.{k}" for k in ("steps", "batch_size", "pack", "beta", "optim", "loss",
                            "loss_kwargs")),
    "compare",
)  # fmt: skip


def _leaves(value, prefix=""):
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if dataclasses.is_dataclass(v):
            yield from _leaves(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", v, typing.get_type_hints(type(value))[f.name]


def _other_value(default, tp):
    """A value of type `tp` unlike `default` (valid enough for the config to build)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:  # None: a single choice cannot be changed
        return next((a for a in typing.get_args(tp) if a != default), None)
    if default is None:
        inner = args[0]
        if typing.get_origin(inner) is typing.Literal:
            return typing.get_args(inner)[0]
        return {int: 2, float: 0.5, str: "x"}[inner]
    if type(None) in typing.get_args(tp):  # an optional Literal or number, set
        return None
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return 2 if default in (-1, 0) else default * 2  # keeps every batch divisible
    if isinstance(default, float):
        return default / 2 if default else 0.5
    if isinstance(default, str):
        return "other"
    if isinstance(default, dict):
        return {"x": {}}
    if default == ():  # ppo.rollout_filters: a list of {name, kwargs} sections
        return (typing.get_args(tp)[0](name="dynamic_sampling"),)
    if isinstance(default, tuple):
        choices = typing.get_args(typing.get_args(tp)[0])
        return default[:1] if len(default) > 1 else (next(c for c in choices if c != default[0]),)
    raise TypeError(f"no other value for {default!r}")


def _set(cfg, key, value):
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def _covers(keys, key):
    return any(key == k or key.startswith(k + ".") for k in keys)


@pytest.mark.parametrize("command", sorted(SECTIONS))
def test_every_set_field_of_a_command_is_read_or_refused(command):
    walked = 0
    for key, default, tp in _leaves(Config()):
        if not _covers(SECTIONS[command], key) or _covers(NOT_OWNED.get(command, ()), key):
            continue
        value = _other_value(default, tp)
        if value is None and default is not None and type(None) not in typing.get_args(tp):
            continue  # task.name: one choice
        cfg = _set(Config(), key, value)
        refused = [k for k, _, _ in unread_settings(cfg, command)]
        walked += 1
        if _covers(READS[command], key):
            assert refused == [], f"{command} reads {key} but refuses {refused}"
        else:
            assert refused == [key], f"`rlhf-jax {command}` neither reads nor refuses {key}"
            with pytest.raises(RlhfJaxError, match=f"config key '{key}' is set, but "):
                refuse_unread(cfg, command)
    assert walked > 30


@pytest.mark.parametrize(
    "command, changes, key, why",
    [
        ("ppo", ["ppo.reward_fn=topics_gold", "ppo.reward_model=rm"], "ppo.reward_model",
         "ppo.reward_fn replaces the reward model"),
        ("ppo", ["ppo.kl_penalty=none", "ppo.beta=0.2"], "ppo.beta", "kl_penalty is none"),
        ("ppo", ["ptx.coef=0", "ptx.data=t.jsonl"], "ptx.data", "ptx.coef is 0"),
        ("ppo", ["ppo.rollout_max_rounds=2"], "ppo.rollout_max_rounds", "rollout_filters is empty"),
        ("pipeline", ["model.path=m", "model.d_model=32"], "model.d_model", "model.path is set"),
        ("pipeline", ["model.path=m", "pretrain.steps=3"], "pretrain.steps", "model.path is set"),
        ("pipeline", ["rm.data=r.jsonl", "rm.k=3"], "rm.k", "rm.data is set"),
        ("pipeline", ["ptx.coef=0", "eval.ptx_ablation=false"], "eval.ptx_ablation", "no ptx"),
        ("pipeline", ["task.name=sums", "rm.steps=3"], "rm.steps", "trains no reward model"),
        ("pipeline", ["task.name=sums", "eval.n_samples=2"], "eval.n_samples", "greedy answer"),
        ("pipeline", ["task.short_fraction=0.5"], "task.short_fraction", "only the sums task"),
        ("dpo", ["dpo.data=d.jsonl", "rm.data=r.jsonl"], "rm.data", "dpo.data is set"),
        ("compare", ["compare.algorithms={g: {policy: runs/sft}}"], "compare.algorithms.g.policy",
         "same SFT policy"),
        ("compare", ["compare.algorithms={g: {prompts: p.jsonl}}"],
         "compare.algorithms.g.prompts", "same prompts"),
        ("compare", ["compare.algorithms={g: {advantage: grpo, samples_per_prompt: 2, "
                     "value_optim.lr: 0.1}}"], "compare.algorithms.g.value_optim", "no critic"),
        ("compare", ["compare.preference={d: {data: d.jsonl}}"], "compare.preference.d.data",
         "reward model's rankings"),
        ("compare", ["compare.preference={d: {heldout_fraction: 0.3}}"],
         "compare.preference.d.heldout_fraction", "reward model's rankings"),
    ],
)  # fmt: skip
def test_a_setting_unread_under_the_others_is_refused(command, changes, key, why):
    cfg = load_config(Config, None, changes)
    with pytest.raises(RlhfJaxError) as e:
        refuse_unread(cfg, command)
    assert str(e.value).startswith(f"config key '{key}' is set, but `rlhf-jax {command}` does")
    assert why in str(e.value)


@pytest.mark.parametrize(
    "changes, why",
    [
        (["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.value_optim.lr=0.1"],
         "needs no critic"),
        (["ppo.critic=shared_trunk", "ppo.value_optim.lr=0.1"], "trains with ppo.policy_optim"),
    ],
)  # fmt: skip
def test_a_critic_setting_without_its_critic_is_said_not_refused(changes, why, capsys):
    """configs/byo.yaml tunes the critic for PPO and docs/byo.md runs GRPO from the same file:
    the unread critic settings are a one-line warning each, not an error and not silence."""
    refuse_unread(load_config(Config, None, changes), "ppo")
    err = capsys.readouterr().err
    assert err.startswith("warning: config key 'ppo.value_optim.lr' is not read by `rlhf-jax ppo`")
    assert why in err and len(err.splitlines()) == 1


def test_shipped_configs_set_nothing_their_commands_ignore():
    for path, commands in (
        ("configs/quickstart.yaml", ("pipeline",)),
        ("configs/compare.yaml", ("compare",)),
        ("configs/critic_compare.yaml", ("compare",)),
        ("configs/byo.yaml", ("sft", "rm", "ppo", "dpo")),
    ):
        cfg = load_config(Config, path)
        for command in commands:
            assert unread_settings(cfg, command) == [], (path, command)
    # docs/byo.md's GRPO run from byo.yaml: its critic settings are said, nothing is refused
    grpo = ["ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.rollout_batch=4"]
    unread = unread_settings(load_config(Config, "configs/byo.yaml", grpo), "ppo")
    assert unread and all(warn_only for _, _, warn_only in unread)


def test_the_cli_refuses_before_creating_the_output(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["ppo", "--output", str(out), "ppo.policy=p", "ppo.prompts=p.jsonl",
            "ppo.reward_fn=topics_gold", "ppo.reward_model=rm"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'ppo.reward_model' is set, but `rlhf-jax ppo`")
    assert len(err.strip().splitlines()) == 1 and not out.exists()
