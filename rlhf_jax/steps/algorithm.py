"""An RL algorithm as named parts resolved from the `ppo` config section: the advantage
estimator, the policy loss, the critic's loss (only when the estimator needs a critic), where
the KL acts, and what scores a response (the reward model, or a reward function over text).

`RLAlgorithm.from_config` resolves every name and checks the parts against each other and the
config before anything is loaded: a misspelt name, a hyperparameter the part does not take, a
group estimator with one sample per prompt, or a loss reading a batch key the run does not
provide (reference log-probs without a KL term, values without a critic) are errors then.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence

from rlhf_jax import contract, registry
from rlhf_jax.config import Config, DPOConfig, PPOConfig, compare_preference_runs, compare_runs
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.ops import REDUCTIONS
from rlhf_jax.rewards import field_lists


@dataclasses.dataclass(frozen=True)
class RLAlgorithm:
    advantage: Callable  # fn(batch) -> AdvantageOut
    policy_loss: Callable  # fn(outputs, batch) -> LossOut
    value_loss: Callable | None  # None: no critic
    kl_penalty: str  # "reward" | "loss" | "none"
    kl_estimator: str  # k1 | k2 | k3 | abs
    reduction: str  # of the KL term in the loss: the policy loss's own reduction
    reward_fn: Callable | None  # host scorer of decoded text; None: the reward model scores
    reward_fn_name: str | None = None
    shared_critic: bool = False  # the critic is a value head on the policy's trunk
    # (name, fn(batch) -> keep [B]) of each rollout filter, in the order they are configured
    filters: tuple[tuple[str, Callable], ...] = ()

    @property
    def needs_critic(self) -> bool:
        return self.value_loss is not None

    @property
    def uses_reference(self) -> bool:
        """Whether reference log-probs are taken (a KL term in the reward or the loss)."""
        return self.kl_penalty != "none"

    @classmethod
    def from_config(cls, ppo: PPOConfig) -> RLAlgorithm:
        advantage = registry.resolve("advantage", ppo.advantage, **ppo.advantage_kwargs)
        facts = registry.info(advantage)
        needs_critic = bool(facts.get("needs_critic", False))
        min_group = int(facts.get("min_group_size", 1))
        if ppo.samples_per_prompt < min_group:
            raise RlhfJaxError(
                f"config key 'ppo.samples_per_prompt': advantage estimator {ppo.advantage!r} "
                f"compares the samples of a prompt and needs at least {min_group}, got "
                f"{ppo.samples_per_prompt}"
            )
        policy_kwargs = dict(ppo.policy_loss_kwargs)
        raw_policy = registry.lookup("policy", ppo.policy_loss)
        if ppo.loss_reduction is not None:
            if "reduction" in policy_kwargs:
                raise RlhfJaxError(
                    "set the reduction once: config keys 'ppo.loss_reduction' and "
                    "'ppo.policy_loss_kwargs.reduction' are both given"
                )
            if not registry.accepts(raw_policy, "reduction"):
                raise RlhfJaxError(
                    f"config key 'ppo.loss_reduction': policy loss {ppo.policy_loss!r} takes no "
                    "'reduction' argument, so the setting would be ignored"
                )
            policy_kwargs["reduction"] = ppo.loss_reduction
        policy_loss = registry.resolve("policy", ppo.policy_loss, **policy_kwargs)
        reduction = policy_kwargs.get("reduction", _default_reduction(raw_policy))
        if reduction not in REDUCTIONS:
            raise RlhfJaxError(
                f"policy loss {ppo.policy_loss!r}: reduction {reduction!r} is not one of "
                f"{', '.join(REDUCTIONS)}"
            )
        shared = ppo.critic == "shared_trunk"
        if shared and not needs_critic:
            raise RlhfJaxError(
                f"config key 'ppo.critic': shared_trunk puts a value head on the policy, but "
                f"advantage estimator {ppo.advantage!r} needs no critic"
            )
        # Resolved (and dry-run below) with or without a critic: a misspelt name fails at load
        # even in a run that does not use it, not in the next run that does.
        value_loss = registry.resolve("value", ppo.value_loss, **ppo.value_loss_kwargs)
        value_keys = contract.batch_keys("value", reference=ppo.kl_penalty != "none")
        contract.dry_run("value", value_loss, ppo.value_loss, value_keys)
        if not needs_critic:
            value_loss = None
        elif ppo.policy_optim.grad_accum > 1:
            accum_key = "ppo.policy_optim.grad_accum"
            contract.require_exact_accumulation("value", value_loss, ppo.value_loss, accum_key)
        reward_fn = None
        if ppo.reward_fn is not None:
            reward_fn = registry.resolve("reward_fn", ppo.reward_fn, **ppo.reward_fn_kwargs)
        algo = cls(
            advantage=advantage,
            policy_loss=policy_loss,
            value_loss=value_loss,
            kl_penalty=ppo.kl_penalty,
            kl_estimator=ppo.kl_kind,
            reduction=reduction,
            reward_fn=reward_fn,
            reward_fn_name=ppo.reward_fn,
            shared_critic=shared,
            filters=tuple(_resolve_filter(ppo, i) for i in range(len(ppo.rollout_filters))),
        )
        algo._check_reads(ppo)
        return algo

    def _check_reads(self, ppo: PPOConfig) -> None:
        """Run each part once on tiny inputs with exactly the keys this run provides."""
        if ppo.trim_update and self.reduction == "seq_mean_token_sum_norm":
            raise RlhfJaxError(
                "config key 'ppo.trim_update': the seq_mean_token_sum_norm reduction divides "
                "by the padded response length, which trimming changes every iteration; "
                "turn one of them off"
            )
        why = []
        if not self.uses_reference:
            why.append("reference log-probs exist only when ppo.kl_penalty is reward or loss")
        if not self.needs_critic:
            why.append(f"values only with a critic (advantage {ppo.advantage!r} needs none)")
        policy_keys = contract.batch_keys(
            "policy", reference=self.uses_reference, critic=self.needs_critic
        )
        contract.dry_run("policy", self.policy_loss, ppo.policy_loss, policy_keys, "; ".join(why))
        if ppo.policy_optim.grad_accum > 1:
            accum = "ppo.policy_optim.grad_accum"
            contract.require_exact_accumulation("policy", self.policy_loss, ppo.policy_loss, accum)
        has_state = registry.info(self.advantage).get("state") is not None
        advantage_keys = contract.batch_keys("advantage", critic=self.needs_critic, state=has_state)
        contract.dry_run("advantage", self.advantage, ppo.advantage, advantage_keys)


def _resolve_filter(ppo: PPOConfig, i: int) -> tuple[str, Callable]:
    """`ppo.rollout_filters[i]` resolved, its group size checked and called once on tiny
    inputs (`contract.dry_run`): a bad name, hyperparameter or return fails at load."""
    spec = ppo.rollout_filters[i]
    try:
        fn = registry.resolve("rollout_filter", spec.name, **spec.kwargs)
        min_group = int(registry.info(fn).get("min_group_size", 1))
        if ppo.samples_per_prompt < min_group:
            raise RlhfJaxError(
                f"rollout filter {spec.name!r} compares the samples of a prompt and needs "
                f"ppo.samples_per_prompt >= {min_group}, got {ppo.samples_per_prompt}"
            )
        contract.dry_run("rollout_filter", fn, spec.name, contract.FILTER_KEYS)
    except RlhfJaxError as e:
        raise RlhfJaxError(f"config key 'ppo.rollout_filters[{i}]': {e}") from None
    return spec.name, fn


def _default_reduction(fn: Callable) -> str:
    """The default of `fn`'s `reduction` parameter, or token_mean."""
    try:
        param = inspect.signature(fn).parameters.get("reduction")
    except (TypeError, ValueError):
        param = None
    if param is None or param.default is inspect.Parameter.empty:
        return "token_mean"
    return param.default


def resolve_preference_loss(dpo: DPOConfig) -> Callable:
    """`dpo.loss` with `dpo.beta` and its kwargs bound, called once on tiny inputs so that a
    bad hyperparameter value or a batch key the stage lacks fails when the config loads."""
    fn = registry.resolve("preference", dpo.loss, beta=dpo.beta, **dpo.loss_kwargs)
    contract.dry_run("preference", fn, dpo.loss, contract.PREFERENCE_KEYS)
    if dpo.optim.grad_accum > 1:
        contract.require_exact_accumulation("preference", fn, dpo.loss, "dpo.optim.grad_accum")
    return fn


def resolve_config_parts(cfg: Config) -> RLAlgorithm:
    """Resolve every part a run's config names (`sft.loss`, `rm.loss`, `ptx.loss`, `dpo.loss`
    and those of `compare.preference`, the RL algorithm of `ppo` and of every
    `compare.algorithms` run): called when a config is
    loaded, so a misspelt name or a hyperparameter a part does not take fails before the first
    stage runs."""
    sft_keys = contract.batch_keys("sft", packed=cfg.sft.pack)
    for kind, name, kwargs, keys, accum_key in (
        ("sft", cfg.sft.loss, cfg.sft.loss_kwargs, sft_keys, "sft.optim.grad_accum"),
        ("reward", cfg.rm.loss, cfg.rm.loss_kwargs, contract.REWARD_KEYS, "rm.optim.grad_accum"),
        ("ptx", cfg.ptx.loss, {}, contract.PTX_KEYS, "ppo.policy_optim.grad_accum"),
    ):
        fn = registry.resolve(kind, name, **kwargs)
        contract.dry_run(kind, fn, name, keys)
        if functools.reduce(getattr, accum_key.split("."), cfg) > 1:
            contract.require_exact_accumulation(kind, fn, name, accum_key)
    resolve_preference_loss(cfg.dpo)
    if cfg.compare.reward_fn is not None:  # (also with no compare run to use it)
        registry.lookup("reward_fn", cfg.compare.reward_fn)
    for name, run in compare_preference_runs(cfg).items():
        try:
            resolve_preference_loss(run.dpo)
        except RlhfJaxError as e:
            raise RlhfJaxError(f"{e} (in compare.preference.{name})") from None
    for name, run in compare_runs(cfg).items():
        try:
            RLAlgorithm.from_config(run.ppo)
        except RlhfJaxError as e:
            raise RlhfJaxError(f"{e} (in compare.algorithms.{name})") from None
    if cfg.ppo.critic == "shared_trunk" and cfg.lora.rank > 0 and "critic" in cfg.lora.models:
        raise RlhfJaxError(
            "config key 'lora.models': 'critic' has no model of its own with "
            "ppo.critic=shared_trunk (its trunk is the policy's: list 'policy')"
        )
    return RLAlgorithm.from_config(cfg.ppo)


def check_reward_fns(cfg: Config, prompts: Sequence[str]) -> None:
    """Call every reward function the config names (`ppo.reward_fn` and those of the
    `compare.algorithms` runs) once on the first of the run's `prompts` (as in the data file)
    with tiny completions: one that raises, or returns anything but one finite number per
    completion, fails with a one-line error naming it, before any model is loaded or trained.
    The run's own prompts, not made-up ones, so that a function looking up its answers by
    prompt finds them. First, every prompt row must carry the fields the function needs
    (`path:LINE: field 'answer': missing (reward function 'gsm8k_strict' needs it)`)."""
    named = {"ppo": cfg.ppo}
    named |= {f"compare.algorithms.{n}": r.ppo for n, r in compare_runs(cfg).items()}
    checked = set()
    for where, ppo in named.items():
        if ppo.reward_fn is None or (ppo.reward_fn, repr(ppo.reward_fn_kwargs)) in checked:
            continue
        checked.add((ppo.reward_fn, repr(ppo.reward_fn_kwargs)))
        fn = registry.resolve("reward_fn", ppo.reward_fn, **ppo.reward_fn_kwargs)
        field_lists(fn, prompts, ppo.reward_fn)  # every row has the fields it needs
        try:
            contract.check_reward_fn(fn, ppo.reward_fn, prompts)
        except RlhfJaxError as e:
            suffix = "" if where == "ppo" else f", in {where}"
            raise RlhfJaxError(f"{e} (a test call before any model loads{suffix})") from None
