"""Every section of a run's configuration, one frozen dataclass each.

Only what the user chooses lives here; what changes during training (beta, learning rate,
step, RNG) is state. Configs never enter `jax.jit`: step factories close over them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from rlhf_jax.errors import RlhfJaxError

field = dataclasses.field

# Keys that became hyperparameters of the part that reads them; a config that still names one
# is told where it went instead of being silently ignored or called a typo.
MOVED_KEYS = {
    "ppo.gamma": "ppo.advantage_kwargs.gamma",
    "ppo.lam": "ppo.advantage_kwargs.lam",
    "ppo.whiten_rewards": "ppo.advantage_kwargs.whiten_rewards",
    "ppo.clip_eps": "ppo.policy_loss_kwargs.clip_eps",
    "ppo.value_clip": "ppo.value_loss_kwargs.clip_range",
}


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts (every float must also be finite)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded
    hi_open: bool = False

    def __str__(self) -> str:
        if self.lo is None and self.hi is None:
            return "a finite number"
        lo, hi = _number(self.lo), _number(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{lo}, {hi}{right}"

    def contains(self, x: float) -> bool:
        if x != x or x in (float("inf"), float("-inf")):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


def _number(x: float | None) -> str:
    """An int in full (a seed's 4294967295), a float as %g (1e-06)."""
    return str(x) if x is None or isinstance(x, int) else f"{x:g}"


POSITIVE = Range(0, lo_open=True)  # > 0
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)  # [0, 1]
BELOW_1 = Range(0, 1, hi_open=True)  # [0, 1)
ANY = Range()  # any finite number
LENGTH = Range(2)  # a sequence needs a token to predict from and one to predict


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The base model: a local Hugging Face folder, or a random model of the given shape."""

    path: str | None = None  # HF checkpoint folder (safetensors); None = random init below
    family: Literal["gpt2", "llama", "qwen2", "qwen3"] = "llama"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_dim: int = 256
    max_len: int = 64  # position table / max_position_embeddings of a random model
    dtype: Literal["float32", "bfloat16"] = "float32"  # computation
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage
    remat: bool = False  # recompute layer activations in backward (saves memory)
    # Attention implementation (docs/design.md, "Attention"): auto picks cudnn on GPU, splash
    # on TPU, blocked on CPU, and dense below models/attention.DENSE_BELOW key slots.
    attention: Literal["auto", "dense", "blocked", "cudnn", "splash"] = "auto"
    # Log-probs, entropies and the LM loss from the LM head in chunks of this many tokens, so
    # no [tokens, vocab] float32 logits are held (docs/memory.md). null = automatic: chunked
    # (~128 MiB of logits per chunk) when one call's logits would reach 1 GiB; 0 = never.
    logits_chunk: int | None = None
    # Storage of the weights RL only reads (the reference policy, the reward model, and a
    # LoRA policy's base, which is the reference): bfloat16 halves them. null = param_dtype.
    # They are computed in `dtype`; log-probs, KL, advantages and losses stay float32.
    frozen_dtype: Literal["float32", "bfloat16"] | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and a decay schedule (optax)."""

    lr: float = 1e-3
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1  # InstructGPT SFT: cosine to 10%; PPO refs: linear to 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # added to sqrt(v_hat), as in PyTorch's Adam
    # added to v_hat inside the sqrt (optax's eps_root); raise it for smaller early steps
    # (TF-style Adam took ~6x smaller first steps than PyTorch's in the N-details study)
    eps_root: float = 0.0
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step, accumulated inside the step
    # Adam's first moment stored in bfloat16 (optax's mu_dtype; the second moment stays in
    # the weights' dtype): 2 bytes per trained parameter less. null = the weights' dtype.
    mu_dtype: Literal["float32", "bfloat16"] | None = None
    # An update whose gradients hold a NaN/Inf is skipped and counted; this many skipped in a
    # row stop the run with an error (the newest checkpoint, from before them, is kept).
    max_consecutive_skips: int = 10


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The built-in task: sizes of the generated data and the simulated labelers. "topics"
    (InstructGPT's pipeline, a reward model from simulated rankings) or "sums" (RLVR: a
    verifiable reward function, no reward model; see docs/algorithms.md)."""

    name: Literal["topics", "sums"] = "topics"
    n_pretrain_texts: int = 4000  # generic sentences: base-model pretraining and ptx data
    n_demonstrations: int = 2000  # SFT demonstrations (mediocre on purpose)
    n_rm_prompts: int = 600  # prompts whose K sampled completions labelers rank
    labeler_noise: float = 0.3  # std of Gaussian noise added to the gold reward when ranking
    n_eval_prompts: int = 128
    vocab_size: int = 384  # BPE vocabulary trained on the task's text
    # sums only: the fraction of demonstrations of two-digit sums that stop short of their
    # `#### <sum>` line (one-digit sums are always answered in full)
    short_fraction: float = 0.75


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the random base model on the task's text (built-in task only)."""

    steps: int = 400
    batch_size: int = 32
    max_len: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Step 1: supervised fine-tuning on demonstrations."""

    data: str | None = None  # JSONL {prompt, completion} or {messages}; None = built-in task
    steps: int = 300
    batch_size: int = 32
    max_len: int = 48
    pack: bool = False  # several demonstrations per row (segment-masked attention)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    loss: str = "default"  # registered name or "package.module:function"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """Step 2: reward model on K-wise rankings (all C(K,2) pairs of a prompt in one element)."""

    data: str | None = None  # JSONL rankings; None = built-in task (sampled + ranked)
    init: str | None = None  # `rlhf-jax rm`: SFT checkpoint folder for the trunk
    allow_ties: bool = False  # accept {"ranks": [...]} rows with equal ranks (no comparison)
    k: int = 4  # completions sampled per prompt for the built-in task
    steps: int = 300
    batch_size: int = 16  # prompts per step (each with its K completions); packed rows with pack
    max_prompt_len: int = 16
    max_completion_len: int = 24
    # Several prompts' K sequences per row of K * L tokens (segment-masked attention,
    # `data/pack.py`): no compute on padding; batch_size then counts packed rows.
    pack: bool = False
    heldout_fraction: float = 0.15
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=10))
    loss: str = "default"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Offline preference optimisation (DPO, IPO, cDPO, robust DPO) on K-wise rankings: every
    C(K, 2) pair of a prompt in one batch element, as the reward model learns from them."""

    data: str | None = None  # JSONL rankings; None = rm.data (the pipeline: the RM's rankings)
    policy: str | None = None  # `rlhf-jax dpo`: SFT checkpoint folder (policy and reference)
    allow_ties: bool = False  # accept {"ranks": [...]} rows with equal ranks (no comparison)
    steps: int = 200
    batch_size: int = 16  # prompts per step (each with its K completions); packed rows with pack
    max_prompt_len: int = 16
    max_completion_len: int = 24
    pack: bool = False  # as rm.pack: prompts packed into rows of K * L tokens
    beta: float = 0.1  # strength of the implicit KL to the reference (the loss's beta)
    heldout_fraction: float = 0.15  # rankings held out for accuracy and KL (0 = none)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10, schedule="linear")
    )
    loss: str = "default"  # dpo | ipo | robust_dpo | "package.module:function"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RolloutFilterSpec:
    """One rollout filter (`rlhf_jax.filters`): a registered name or "package.module:function",
    and its hyperparameters."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Step 3: RL from the SFT policy. InstructGPT's PPO by default (a critic, GAE, the KL
    penalty in the reward); GRPO, RLOO, REINFORCE++, Dr. GRPO, ... by naming their parts
    (see docs/algorithms.md)."""

    prompts: str | None = None  # JSONL {prompt}; None = built-in task
    policy: str | None = None  # `rlhf-jax ppo`: SFT checkpoint folder (policy and reference)
    reward_model: str | None = None  # `rlhf-jax ppo`: reward model folder from `rlhf-jax rm`
    # A function over decoded text scoring each response (a verifiable reward): a registered
    # name (the built-in task's "topics_gold") or "package.module:function". Replaces the
    # reward model in RL when set.
    reward_fn: str | None = None
    reward_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    iterations: int = 60
    rollout_batch: int = 64  # prompts per iteration
    samples_per_prompt: int = 1  # G responses sampled per prompt (a group; GRPO, RLOO: >= 2)
    minibatch_size: int = 16  # sampled responses per optimizer update
    epochs: int = 2  # passes over the rollout batch, reshuffled every epoch
    # Responses per micro-batch of the experience's forwards (reference log-probs, reward
    # model, critic), run one after another: 0 = the whole rollout batch at once. Must
    # divide the iteration's responses; lowers the experience's temporaries, same results.
    experience_micro_batch: int = 0
    # The sampler goes on with the unfinished responses in a half-size batch whenever at most
    # half are left (rollout/decode.py): time follows the tokens generated, not rows x the
    # longest. Same tokens; log-probs may differ in the last float bits (a smaller matmul).
    compact_finished_rows: bool = False
    # The update runs on the experience cut to the iteration's longest prompt and response,
    # each rounded up to a power of two (steps/rl_trim.py): it stops computing padding
    # columns. Same results up to float rounding; one compiled update per length bucket.
    # Not with the seq_mean_token_sum_norm reduction (its constant is the padded length).
    trim_update: bool = False
    # The update's trunk forwards run on packed rows: each micro-batch's sequences laid end to
    # end in as few rows as they fit (steps/rl_pack.py), so the trunk stops computing padding
    # whatever the lengths; the LM and value heads run on the real response tokens only, and
    # the losses on the padded rows. Same results up to float rounding; one compiled update
    # per packed row count and response-slot count (each a power of two).
    pack_update: bool = False
    # How finely trim_update's lengths and pack_update's packed rows and response slots are
    # rounded up: 1 bucket per doubling (powers of two), 2 (also 1.5x: 4, 6, 8, 12, ...), 4
    # or 8. More buckets compute less padding and compile up to that many times more update
    # programs (docs/memory.md, "The RL update: trimmed and packed").
    buckets_per_doubling: Literal[1, 2, 4, 8] = 1
    # The sampler runs the layers as a scan over the stacked weights (and a stacked KV cache)
    # instead of unrolled over per-layer copies of the weights made for every sampling call:
    # a whole copy of the policy's layers less in the experience (docs/memory.md, "Fitting
    # 80 GB"), at the cost of slower decode steps on XLA:CPU. Same tokens and log-probs up to
    # float rounding.
    decode_layer_scan: bool = False
    max_prompt_len: int = 16
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling; also divides logits wherever log-probs are taken
    top_k: int | None = None  # sampling; every log-prob then over the kept set (algorithms.md)
    top_p: float | None = None
    policy_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, schedule="linear", final_lr_ratio=0.0)
    )
    # The critic's optimizer; unused (and no critic exists) when the estimator needs none.
    value_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, schedule="linear", final_lr_ratio=0.0)
    )
    # Advantage estimator: gae (needs a critic) | grpo | dr_grpo | rloo | reinforce_pp |
    # reinforce_pp_baseline | "package.module:function"; its hyperparameters (gae: gamma,
    # lam, whiten_rewards, whiten) in advantage_kwargs.
    advantage: str = "gae"
    advantage_kwargs: dict[str, Any] = field(default_factory=dict)
    # Where the KL to the SFT policy acts: subtracted from the reward on every token
    # (InstructGPT), added to the loss (GRPO), or nowhere (no reference model is kept).
    kl_penalty: Literal["reward", "loss", "none"] = "reward"
    # Estimator of the per-token KL (ops.kl_estimate); null = k1 in the reward, k3 in the loss.
    kl_estimator: Literal["k1", "k2", "k3", "abs"] | None = None
    beta: float = 0.05  # initial KL coefficient
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller toward kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    vf_coef: float = 0.1  # weight of the critic's loss (when there is a critic)
    # The critic (for estimators that need one): a separate value model started from the
    # reward model (InstructGPT), or a value head on the policy's own trunk (three models in
    # memory instead of four, one trunk forward less per update; the head trains with the
    # policy's optimizer, so ppo.value_optim is unused).
    critic: Literal["separate", "shared_trunk"] = "separate"
    # A response that never emits EOS is scored `score - missing_eos_penalty` (null: no penalty).
    missing_eos_penalty: float | None = 1.0
    # Or a fixed score for such responses, replacing the RM's (takes precedence when set).
    missing_eos_score: float | None = None
    ema_decay: float = 0.992  # EMA of policy weights for evaluation; 0 = off
    policy_loss: str = "default"  # ppo_clip | ppo_dual_clip | gspo | cispo | "pkg.mod:fn"
    policy_loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # How per-token policy-loss terms are reduced; null = the policy loss's own default
    # (token_mean, or seq_mean_token_mean for gspo). Also used by the KL term in the loss.
    loss_reduction: (
        Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] | None
    ) = None
    value_loss: str = "default"
    value_loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # Filters between scoring and the update, e.g. [{name: dynamic_sampling}] (DAPO): groups
    # they drop are replaced by groups sampled for other prompts (docs/algorithms.md).
    rollout_filters: tuple[RolloutFilterSpec, ...] = ()
    # Sampling rounds per iteration at most while the kept groups do not fill the batch; the
    # rest is then filled with dropped groups (rollout/filter_filled_fraction says how much).
    rollout_max_rounds: int = 4

    @property
    def episodes(self) -> int:
        """Sampled responses per iteration: rollout_batch prompts x samples_per_prompt."""
        return self.rollout_batch * self.samples_per_prompt

    @property
    def kl_kind(self) -> str:
        """The KL estimator in effect (the default depends on where the KL acts)."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k3" if self.kl_penalty == "loss" else "k1"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021): the models named in `models` train only
    adapters on their projections; their base weights stay frozen, their optimizer holds the
    adapters' moments alone, and checkpoints hold only what trains. The weights a stage
    writes (OUTPUT/sft, OUTPUT/rm, ...) have the adapters folded in, so transformers and the
    next stage load them as a plain model. RL's reference policy is the base with the
    adapters switched off: no second copy. See docs/memory.md."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    # Projections that get adapters: q, k, v, o (attention) and gate, up, down (MLP)
    targets: tuple[Literal["q", "k", "v", "o", "gate", "up", "down"], ...] = (
        "q", "k", "v", "o", "gate", "up", "down",
    )  # fmt: skip
    # Which models train adapters: policy (sft, dpo and the RL policy), reward (rm), critic
    # (the RL value model). Pretraining from scratch always trains every weight.
    models: tuple[Literal["policy", "reward", "critic"], ...] = ("policy",)
    # Also write the policy's adapters alone, in the layout PEFT loads onto the base model,
    # beside the merged folder: OUT/sft_adapter, OUT/policy_adapter (Llama/Qwen families).
    save_adapters: bool = False


@dataclasses.dataclass(frozen=True)
class PtxConfig:
    """PPO-ptx: gamma * E_pretrain[log pi(x)] accumulated into the same gradient as PPO."""

    coef: float = 1.0  # gamma; 0 turns PPO-ptx into plain PPO
    batch_size: int = 16  # pretraining sequences per PPO minibatch
    data: str | None = None  # JSONL {text}; None = the built-in task's pretraining text
    max_len: int = 32
    loss: str = "default"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    n_samples: int = 1  # completions sampled per eval prompt and policy (gold reward averaged)
    temperature: float = 1.0
    bootstrap: int = 2000  # resamples for confidence intervals
    # Also run PPO with ptx.coef=0 from the same SFT/RM and report its pretraining loss.
    ptx_ablation: bool = True


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """`rlhf-jax compare`: several RL algorithms from the same SFT policy and reward model,
    evaluated on the same held-out prompts (docs/algorithms.md)."""

    # name -> changes to the `ppo` section for that run (nested or dotted keys), e.g.
    # {"grpo": {"advantage": "grpo", "samples_per_prompt": 4, "rollout_batch": 16}}
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each algorithm once more with this reward function in place of the reward model, named
    # "<name>_gold" (the built-in task's gold reward used as a verifiable reward); null = not.
    reward_fn: str | None = "topics_gold"
    # name -> changes to the `dpo` section: offline preference runs from the same SFT policy
    # on the rankings the reward model learns from, e.g. {"dpo": {}, "ipo": {"loss": "ipo"}}
    preference: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Train and evaluate every row once per seed (seed + 0, ..., seed + seeds - 1) from the
    # one foundation built from `seed`; the report gives means over seeds with a Student-t
    # 95% interval across them (1: today's single run, bootstrap interval over prompts).
    seeds: int = 1

    def __post_init__(self) -> None:
        """Each row's name becomes a folder (OUT/policies/<name>), a checkpoint stage and a
        report row: it must be a plain name, and one name must never stand for two rows."""
        claims: list[tuple[str, str]] = []  # (row name, what it stands for): user rows first
        for key, rows in (("algorithms", self.algorithms), ("preference", self.preference)):
            for name in rows:
                if not isinstance(name, str) or not ROW_NAME.fullmatch(name):
                    raise RlhfJaxError(
                        f"config key 'compare.{key}': row name {name!r} is not a plain folder "
                        "name (it names OUT/policies/<name>): use 1-64 letters, digits, '_' or "
                        "'-', starting with a letter or digit"
                    )
                claims.append((name, f"compare.{key}.{name}"))
        if self.reward_fn is not None:
            for name in self.algorithms:
                twin = f"the gold-reward twin of compare.algorithms.{name} (compare.reward_fn "
                claims.append((f"{name}_gold", twin + "adds '<name>_gold' for every algorithm)"))
        seen: dict[str, str] = {}
        for name, what in claims:
            if name in seen:
                raise RlhfJaxError(
                    f"config key '{seen[name]}': the row name '{name}' is also {what}; one row "
                    f"would train and then be overwritten by the other (OUT/policies/{name}, "
                    "its checkpoints, its report row). Rename one"
                )
            seen[name] = what


# A compare row's name: it names a folder, a checkpoint stage and a report row.
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10  # steps between progress-bar metric updates and JSONL lines
    tensorboard: bool = False  # also write TensorBoard event files (needs tensorboardX)
    wandb: bool = False  # also log to Weights & Biases (pip install 'rlhf-jax[wandb]');
    # WANDB_MODE=offline keeps the run on disk (OUTPUT/wandb) for `wandb sync` later
    wandb_project: str = "rlhf-jax"
    wandb_name: str | None = None  # the run's name in W&B; None = W&B's generated one
    progress: bool = True


# The fields that hold a file or folder path, per section: `~` is expanded and an empty path
# is refused when the config loads.
PATHS: dict[str, tuple[str, ...]] = {
    "ModelSpec": ("path",),
    "SFTConfig": ("data",),
    "RMConfig": ("data", "init"),
    "DPOConfig": ("data", "policy"),
    "PPOConfig": ("prompts", "policy", "reward_model"),
    "PtxConfig": ("data",),
}

# The range of every numeric field, checked when a config is loaded (the loader names the key);
# tests/test_config.py walks the schema to prove that no numeric field is missing here.
RANGES: dict[str, dict[str, Range]] = {
    "ModelSpec": {
        "d_model": AT_LEAST_1,
        "n_layers": AT_LEAST_1,
        "n_heads": AT_LEAST_1,
        "n_kv_heads": AT_LEAST_1,
        "mlp_dim": AT_LEAST_1,
        "max_len": LENGTH,
        "logits_chunk": AT_LEAST_0,
    },
    "OptimConfig": {
        "lr": POSITIVE,
        "warmup_steps": AT_LEAST_0,
        "final_lr_ratio": FRACTION,
        "weight_decay": AT_LEAST_0,
        "b1": BELOW_1,
        "b2": BELOW_1,
        "eps": AT_LEAST_0,
        "eps_root": AT_LEAST_0,
        "grad_clip": AT_LEAST_0,
        "grad_accum": AT_LEAST_1,
        "max_consecutive_skips": AT_LEAST_1,
    },
    "TaskConfig": {
        "n_pretrain_texts": AT_LEAST_1,
        "n_demonstrations": AT_LEAST_1,
        "n_rm_prompts": AT_LEAST_1,
        "labeler_noise": AT_LEAST_0,
        "n_eval_prompts": AT_LEAST_1,
        "vocab_size": Range(259),  # the 256 bytes and 3 special tokens at least
        "short_fraction": FRACTION,
    },
    "PretrainConfig": {"steps": AT_LEAST_0, "batch_size": AT_LEAST_1, "max_len": LENGTH},
    "SFTConfig": {"steps": AT_LEAST_0, "batch_size": AT_LEAST_1, "max_len": LENGTH},
    "RMConfig": {
        "k": Range(2, 9),
        "steps": AT_LEAST_0,
        "batch_size": AT_LEAST_1,
        "max_prompt_len": AT_LEAST_1,
        "max_completion_len": AT_LEAST_1,
        "heldout_fraction": Range(0, 1, lo_open=True, hi_open=True),
    },
    "DPOConfig": {
        "steps": AT_LEAST_0,
        "batch_size": AT_LEAST_1,
        "max_prompt_len": AT_LEAST_1,
        "max_completion_len": AT_LEAST_1,
        "beta": POSITIVE,
        "heldout_fraction": Range(0, 1, hi_open=True),
    },
    "PPOConfig": {
        "iterations": AT_LEAST_0,
        "rollout_batch": AT_LEAST_1,
        "samples_per_prompt": AT_LEAST_1,
        "minibatch_size": AT_LEAST_1,
        "epochs": AT_LEAST_1,
        "experience_micro_batch": AT_LEAST_0,
        "max_prompt_len": AT_LEAST_1,
        "max_new_tokens": AT_LEAST_1,
        "temperature": POSITIVE,
        "top_k": AT_LEAST_1,
        "top_p": Range(0, 1, lo_open=True),
        "beta": AT_LEAST_0,
        "kl_target": POSITIVE,
        "kl_horizon": AT_LEAST_1,
        "vf_coef": AT_LEAST_0,
        "missing_eos_penalty": ANY,
        "missing_eos_score": ANY,
        "ema_decay": BELOW_1,
        "rollout_max_rounds": AT_LEAST_1,
    },
    "PtxConfig": {"coef": AT_LEAST_0, "batch_size": AT_LEAST_1, "max_len": LENGTH},
    "LoraConfig": {"rank": AT_LEAST_0, "alpha": POSITIVE},
    "CompareConfig": {"seeds": AT_LEAST_1},
    "EvalConfig": {"n_samples": AT_LEAST_1, "temperature": AT_LEAST_0, "bootstrap": AT_LEAST_1},
    "LogConfig": {"every": AT_LEAST_1},
    # mesh axes: a size or -1 ("the rest"), checked in MeshConfig itself
    "MeshConfig": {"data": Range(-1), "fsdp": Range(-1), "tensor": Range(-1)},
    "DistributedConfig": {
        "num_processes": AT_LEAST_1,
        "process_id": AT_LEAST_0,
        "heartbeat_timeout_s": AT_LEAST_1,
    },
    "CheckpointConfig": {"save_every": AT_LEAST_0, "keep": AT_LEAST_1, "stop_after": AT_LEAST_0},
    # jax.random.key keeps 32 bits: seed 2**32 would silently repeat seed 0's stream
    "Config": {"seed": Range(0, 2**32 - 1)},
}


DEFAULT_RULES: dict[str, Any] = {
    # logical axis name -> mesh axis (or list of mesh axes, or null = replicated)
    "batch": ["data", "fsdp"],
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "head_dim": None,
    "position": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh over all global devices; -1 means "the remaining devices" (at most one)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Logical axis names of weights and batches -> mesh axes. Overrides merge into the default.
    rules: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RULES))
    # Where activations are split unlike the weights' rules say (merged over `rules` and the
    # defaults `{embed: null, length: null}`: an activation's model dimension stays whole on
    # an FSDP mesh, its batch is split); see docs/distributed.md.
    activation_rules: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", {**DEFAULT_RULES, **self.rules})
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if sum(v == -1 for v in sizes.values()) > 1:
            raise RlhfJaxError("config section 'mesh': at most one axis may be -1")
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise RlhfJaxError(f"config key 'mesh.{axis}': {size} is not a size (or -1)")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs. On TPU pods everything is discovered automatically; elsewhere give
    the coordinator (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # Seconds without a heartbeat before the coordinator declares a process dead and stops the
    # run (else RLHF_JAX_HEARTBEAT_TIMEOUT_S, else JAX's 100). Raise it where processes share
    # an oversubscribed machine: a starved process misses heartbeats while it is healthy.
    heartbeat_timeout_s: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints under OUTPUT/checkpoints/<stage>/ (orbax): weights, optimizer, beta, EMA,
    data position. Rerunning the same command continues from the newest one."""

    save_every: int = 0  # steps (PPO: iterations) between saves; 0 = end of stage and SIGTERM
    keep: int = 2  # newest checkpoints kept per stage
    async_save: bool = True
    resume: bool = True  # continue from OUTPUT/checkpoints when present
    # Stop each stage after this many steps this session, saving a checkpoint (0 = off): a
    # time-boxed run, or a rehearsal of preemption. Rerun to continue.
    stop_after: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How every JSONL file of the run is read."""

    # raise: the first bad row stops the run (file, line, field; exit 2) before any compile.
    # skip: bad rows (and prompts too long for their token budget) are left out and counted in
    # the run's summary (report.json / summary.json), with the line and reason of each.
    on_error: Literal["raise", "skip"] = "raise"
    # Render every plain prompt (SFT, rankings, RL and evaluation prompts) as one user message
    # through the tokenizer's chat template, with its generation prompt: the format a
    # chat-tuned model expects. Rows in {"messages": [...]} form use the template anyway.
    chat_template: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole pipeline run: pretrain (built-in task) -> SFT -> RM -> PPO(-ptx) -> eval."""

    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ptx: PtxConfig = field(default_factory=PtxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    log: LogConfig = field(default_factory=LogConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        """Checks across fields; each field's own range is in RANGES (checked on load)."""
        p = self.ppo
        if p.minibatch_size < 1 or p.episodes % p.minibatch_size:
            raise RlhfJaxError(
                f"config key 'ppo.minibatch_size': {p.minibatch_size} does not divide the "
                f"{p.episodes} responses of an iteration (ppo.rollout_batch={p.rollout_batch} x "
                f"ppo.samples_per_prompt={p.samples_per_prompt})"
            )
        m = p.experience_micro_batch
        if m and p.episodes % m:
            raise RlhfJaxError(
                f"config key 'ppo.experience_micro_batch': {m} does not divide the "
                f"{p.episodes} responses of an iteration (ppo.rollout_batch={p.rollout_batch} x "
                f"ppo.samples_per_prompt={p.samples_per_prompt})"
            )
        if self.lora.rank > 0 and not self.lora.targets:
            raise RlhfJaxError("config key 'lora.targets': LoRA needs at least one projection")
        if p.kl_penalty == "none" and p.adaptive_kl:
            raise RlhfJaxError(
                "config key 'ppo.adaptive_kl': the KL controller needs a KL term, but "
                "ppo.kl_penalty is none"
            )
        for name, optim, batch in (
            ("sft", self.sft.optim, self.sft.batch_size),
            ("rm", self.rm.optim, self.rm.batch_size),
            ("dpo", self.dpo.optim, self.dpo.batch_size),
            ("ppo.policy", p.policy_optim, p.minibatch_size),
        ):
            if optim.grad_accum < 1 or batch % optim.grad_accum:
                raise RlhfJaxError(
                    f"config key '{name}.optim.grad_accum' ({optim.grad_accum}) must be >= 1 "
                    f"and divide the batch size ({batch})"
                )
