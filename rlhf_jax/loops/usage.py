"""Settings a command would accept and then ignore are refused before it starts.

A config file is shared between commands (configs/byo.yaml serves `sft`, `rm`, `ppo` and
`dpo`), so a section another command reads is never an error. But a key of a command's own
sections that this command, as configured, never reads is: `ppo.reward_model` beside
`ppo.reward_fn`, `lora.alpha` with LoRA off, `ptx.data` with ptx off (a warning only for
the critic's settings without a critic, see `Unread.warn_only`). Each rule names the keys and
says why they are unread; tests/loops/test_usage.py walks every command's sections and checks
that each set field is read or refused here.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import jax

from rlhf_jax import stage_registry
from rlhf_jax.advantages import estimator_needs_critic
from rlhf_jax.config import Config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.tasks import VERIFIABLE

# The keys that shape a random model; a command that loads a model folder takes them from
# its config.json.
RANDOM_MODEL = tuple(
    f"model.{k}" for k in ("family", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")
) + ("model.max_len",)
LORA_DETAILS = ("lora.alpha", "lora.targets", "lora.models", "lora.save_adapters")
PTX_DETAILS = ("ptx.data", "ptx.batch_size", "ptx.max_len", "ptx.loss")


@dataclasses.dataclass(frozen=True)
class Unread:
    """`keys` (dotted; a section name covers its sub-keys) are not read when `when(cfg)`."""

    keys: tuple[str, ...]
    why: str
    when: Callable[[Config], bool] = lambda cfg: True
    # Said in a warning instead of refused: settings that one config file legitimately
    # holds for several algorithms (configs/byo.yaml tunes the critic's optimizer for PPO,
    # and docs/byo.md runs GRPO from the same file with ppo.advantage=grpo).
    warn_only: bool = False


def _needs_critic(cfg: Config) -> bool:
    try:
        return estimator_needs_critic(cfg.ppo.advantage)
    except RlhfJaxError:
        return True  # a misspelt estimator fails on its own, with its own message


EVERY_COMMAND = (
    Unread(LORA_DETAILS, "LoRA is off (lora.rank is 0)", lambda c: c.lora.rank == 0),
    Unread(
        ("log.wandb_project", "log.wandb_name"), "log.wandb is false", lambda c: not c.log.wandb
    ),
)

# The `ppo` section as the RL loop reads it (the `ppo` command, the pipeline's RL stage).
RL = (
    Unread(
        ("ppo.reward_fn_kwargs",),
        "they are the arguments of ppo.reward_fn, which is not set",
        lambda c: c.ppo.reward_fn is None,
    ),
    Unread(
        ("ppo.value_optim", "ppo.vf_coef", "ppo.value_loss", "ppo.value_loss_kwargs"),
        "the estimator ppo.advantage names needs no critic, so none exists",
        lambda c: not _needs_critic(c),
        warn_only=True,
    ),
    Unread(
        ("ppo.value_optim",),
        "with ppo.critic=shared_trunk the value head trains with ppo.policy_optim",
        lambda c: c.ppo.critic == "shared_trunk",
        warn_only=True,
    ),
    Unread(
        ("ppo.kl_target", "ppo.kl_horizon"),
        "they steer the adaptive KL controller, and ppo.adaptive_kl is false",
        lambda c: not c.ppo.adaptive_kl,
    ),
    Unread(
        ("ppo.beta", "ppo.kl_estimator"),
        "ppo.kl_penalty is none (no KL term)",
        lambda c: c.ppo.kl_penalty == "none",
    ),
    Unread(
        ("ppo.missing_eos_penalty",),
        "ppo.missing_eos_score replaces the penalised score",
        lambda c: c.ppo.missing_eos_score is not None,
    ),
    Unread(PTX_DETAILS, "ptx.coef is 0 (no ptx term)", lambda c: c.ptx.coef == 0),
    Unread(
        ("ppo.rollout_max_rounds",),
        "ppo.rollout_filters is empty, so every iteration samples once",
        lambda c: not c.ppo.rollout_filters,
    ),
)

# The pipeline and compare train their own SFT policy and reward model from model.path (or
# the built-in task): the stage commands' input folders are theirs alone.
FOUNDATION = (
    Unread(
        ("rm.init", "ppo.policy", "ppo.reward_model"),
        "it names an input of `rlhf-jax rm` / `rlhf-jax ppo`; this command trains its own "
        "SFT policy and reward model (OUT/sft, OUT/rm)",
    ),
    Unread(
        RANDOM_MODEL + ("pretrain",),
        "model.path is set, so no random model is built or pretrained",
        lambda c: c.model.path is not None,
    ),
    Unread(
        ("rm.k", "task.n_rm_prompts", "task.labeler_noise"),
        "rm.data is set, so no rankings are sampled and labelled",
        lambda c: c.rm.data is not None,
    ),
    Unread(
        ("task.n_demonstrations",),
        "sft.data is set, so no demonstrations are generated",
        lambda c: c.sft.data is not None,
    ),
    Unread(
        ("task.short_fraction",),
        "only the sums task reads it (task.name is not sums)",
        lambda c: c.task.name != "sums",
    ),
)

# The pipeline on a verifiable-reward task (loops/rlvr.py): no reward model, greedy answers.
RLVR = (
    Unread(
        ("rm", "task.n_rm_prompts", "task.labeler_noise"),
        "the pipeline trains no reward model on a verifiable-reward task (ppo.reward_fn "
        "scores the RL stage)",
        lambda c: c.task.name in VERIFIABLE,
    ),
    Unread(
        ("eval.n_samples", "eval.temperature", "eval.ptx_ablation"),
        "a verifiable-reward task is evaluated on one greedy answer per prompt",
        lambda c: c.task.name in VERIFIABLE,
    ),
)

# `rlhf-jax compare` on a verifiable-reward task (loops/compare_rlvr.py).
RLVR_COMPARE = (
    Unread(
        ("compare.reward_fn",),
        "its '<name>_gold' rows rerun each row on the topics task's hidden gold reward; on a "
        "verifiable-reward task every row already trains on ppo.reward_fn (set it to null)",
        lambda c: c.task.name in VERIFIABLE and c.compare.reward_fn is not None,
    ),
    Unread(
        ("compare.preference",),
        "offline preference rows train on the reward model's rankings, and a "
        "verifiable-reward task samples none",
        lambda c: c.task.name in VERIFIABLE,
    ),
)

LOADED_MODEL = "the command loads a model folder, whose config.json sets its shape"

# The stage commands' own rules, named by their `StageDef`s (rlhf_jax/stage_registry.py).
SFT_COMMAND = (
    Unread(RANDOM_MODEL, LOADED_MODEL),
    Unread(("model.frozen_dtype",), "only RL has frozen models"),
)
RM_COMMAND = (
    Unread(RANDOM_MODEL, LOADED_MODEL),
    Unread(("model.frozen_dtype",), "only RL has frozen models"),
    Unread(("model.logits_chunk",), "a reward model has no LM head"),
    Unread(
        ("rm.k",),
        "rm.k sizes the built-in task's sampled rankings; `rlhf-jax rm` "
        "reads its rankings from rm.data",
    ),
)
PPO_COMMAND = (
    Unread(RANDOM_MODEL, LOADED_MODEL),
    Unread(
        ("ppo.reward_model",),
        "ppo.reward_fn replaces the reward model",
        lambda c: c.ppo.reward_fn is not None,
    ),
    *RL,
)
DPO_COMMAND = (
    Unread(RANDOM_MODEL, LOADED_MODEL),
    Unread(
        ("model.frozen_dtype",),
        "DPO's reference log-probs are computed once, before training, from the loaded policy",
    ),
    Unread(("rm.data",), "dpo.data is set and is read instead", lambda c: c.dpo.data is not None),
)

# The whole-task commands' rules (each stage command's are in its StageDef).
RULES: dict[str, tuple[Unread, ...]] = {
    "pipeline": (
        *FOUNDATION,
        *RLVR,
        *RL,
        Unread(
            ("eval.ptx_ablation",), "ptx.coef is 0: no ptx to ablate", lambda c: c.ptx.coef == 0
        ),
    ),
    "compare": (
        *FOUNDATION,
        *RLVR,
        *RLVR_COMPARE,
        Unread(("eval.ptx_ablation",), "only `rlhf-jax pipeline` runs the ptx ablation"),
        Unread(PTX_DETAILS, "ptx.coef is 0 (no ptx term)", lambda c: c.ptx.coef == 0),
    ),
}

RUNTIME = ("log", "checkpoint", "mesh", "distributed")
EVERYTHING = ("seed", "model", "task", "data", "pretrain", "sft", "rm", "ppo", "ptx", "lora",
              "eval", *RUNTIME)  # fmt: skip
# The sections (or keys) each whole-task command owns (a stage command's are its StageDef's
# `sections`): a key set there is read or refused. Sections of other commands sharing the
# config file are theirs.
TASK_SECTIONS: dict[str, tuple[str, ...]] = {
    "pipeline": EVERYTHING,
    "compare": (*EVERYTHING, "dpo", "compare"),
}
ROW_UNREAD_PREFERENCE = (
    "data", "policy", "allow_ties", "max_prompt_len", "max_completion_len", "heldout_fraction",
)  # fmt: skip
# Keys of a `compare.algorithms` / `compare.preference` row that compare never reads: the
# runs share the foundation's policy, reward model, prompts and rankings.
ROW_UNREAD: dict[str, tuple[tuple[str, ...], str]] = {
    "algorithms": (
        ("policy", "reward_model", "prompts", "max_prompt_len"),
        "every compare run starts from the same SFT policy and reward model (OUT/sft, OUT/rm) "
        "on the same prompts (ppo.prompts, ppo.max_prompt_len)",
    ),
    "preference": (
        ROW_UNREAD_PREFERENCE,
        "every preference run trains on the reward model's rankings (rm.data and the rm.* "
        "keys that read and split them) from the same SFT policy",
    ),
}
# Keys inside those sections that are another command's input: model.path is the base model
# of `sft` and `rm`; `ppo` and `dpo` start from ppo.policy / dpo.policy.
# The dpo keys compare's preference runs do not read (ROW_UNREAD) are `rlhf-jax dpo`'s.
TASK_NOT_OWNED: dict[str, tuple[str, ...]] = {
    "compare": tuple(f"dpo.{k}" for k in ROW_UNREAD_PREFERENCE),
}


def sections(command: str) -> tuple[str, ...]:
    """The config sections/keys `command` owns: a registered stage's, or a task command's."""
    defined = stage_registry.stage(command)
    return defined.sections if defined is not None else TASK_SECTIONS[command]


def not_owned(command: str) -> tuple[str, ...]:
    defined = stage_registry.stage(command)
    return defined.not_owned if defined is not None else TASK_NOT_OWNED.get(command, ())


# Snapshots at import, every command's (the registered stages' and the task commands').
SECTIONS = {s.name: s.sections for s in stage_registry.stages() if s.run} | TASK_SECTIONS
NOT_OWNED = {s.name: s.not_owned for s in stage_registry.stages() if s.not_owned}
NOT_OWNED |= TASK_NOT_OWNED


def _fields(value, prefix: str = "") -> dict:
    """{dotted key: value} of a config's fields; a dict-typed field (loss_kwargs, mesh.rules)
    is one value."""
    out: dict = {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_fields(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _covers(keys: tuple[str, ...], key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in keys)


def _rules(command: str) -> tuple[Unread, ...]:
    defined = stage_registry.stage(command)
    own = RULES[command] if defined is None else tuple(stage_registry.load(defined.unread))
    return (*own, *EVERY_COMMAND)


def unread_settings(cfg: Config, command: str) -> list[tuple[str, str, bool]]:
    """`[(key, why, warn_only)]` of the keys set in `cfg` (unlike the defaults) that
    `rlhf-jax <command>` owns but does not read, as configured."""
    now, default = _fields(cfg), _fields(Config())
    out = []
    for key, value in now.items():
        if value == default[key] or not _covers(sections(command), key):
            continue
        if _covers(not_owned(command), key):
            continue
        rule = next((r for r in _rules(command) if _covers(r.keys, key) and r.when(cfg)), None)
        if rule is not None:
            out.append((key, rule.why, rule.warn_only))
    if command == "compare":
        out += _unread_in_rows(cfg)
    return out


def _unread_in_rows(cfg: Config) -> list[tuple[str, str, bool]]:
    """Keys a compare row sets that its run does not read: ROW_UNREAD, and the RL rules
    applied to each algorithm's own config (a GRPO row's critic settings, ...). A row's key
    is that row's alone, so each is refused."""
    from rlhf_jax.config import compare_runs
    from rlhf_jax.config.loader import nest_dotted

    out = []
    runs = compare_runs(cfg)
    for kind, rows in (
        ("algorithms", cfg.compare.algorithms),
        ("preference", cfg.compare.preference),
    ):
        keys, why = ROW_UNREAD[kind]
        for name, changes in rows.items():
            for key in nest_dotted(changes):
                if key in keys:
                    out.append((f"compare.{kind}.{name}.{key}", why, False))
                elif kind == "algorithms":
                    rule = next(
                        (r for r in RL if _covers(r.keys, f"ppo.{key}") and r.when(runs[name])),
                        None,
                    )
                    if rule is not None:
                        out.append((f"compare.algorithms.{name}.{key}", rule.why, False))
    return out


def refuse_unread(cfg: Config, command: str) -> None:
    """Raise on the first key `unread_settings` finds (naming the others); keys of a
    warn-only rule are said on stderr, one line each."""
    unread = unread_settings(cfg, command)
    refused = [(k, why) for k, why, warn_only in unread if not warn_only]
    if refused:
        key, why = refused[0]
        more = f" (also unread: {', '.join(k for k, _ in refused[1:])})" if len(refused) > 1 else ""
        raise RlhfJaxError(
            f"config key '{key}' is set, but `rlhf-jax {command}` does not read it: {why}. "
            f"Remove it{more}"
        )
    if jax.process_index() == 0:
        for key, why, _ in unread:
            print(
                f"warning: config key '{key}' is not read by `rlhf-jax {command}`: {why}",
                file=sys.stderr,
            )
