"""The supervised stages as host loops over the pure steps: LM (pretrain / SFT) and the RM,
with their evaluation helpers. The RL stage is in `loops/rl.py`."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import Config, LoraConfig, ModelSpec, PretrainConfig, SFTConfig
from rlhf_jax.loops.adapters import adapter_key, announce, save_stage_adapters, stage_weights
from rlhf_jax.loops.batched import map_params
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import train_section
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig, forward, init_params, init_scalar_head, scalar_trunk
from rlhf_jax.models.config import FAMILY_SWITCHES
from rlhf_jax.ops import next_token_logprobs
from rlhf_jax.sharding import init_sharded
from rlhf_jax.steps import (
    completion_rewards,
    make_reward_step,
    make_sft_step,
    score_sequences,
)


def random_model_config(spec: ModelSpec, tokenizer) -> ModelConfig:
    """A fresh model of `spec`'s shape over `tokenizer`'s vocabulary."""
    n_kv = spec.n_heads if spec.family == "gpt2" else spec.n_kv_heads
    return ModelConfig(
        model_type=spec.family,
        vocab_size=len(tokenizer),
        d_model=spec.d_model,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=n_kv,
        head_dim=spec.d_model // spec.n_heads,
        mlp_dim=spec.mlp_dim,
        max_position_embeddings=spec.max_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=spec.dtype,
        param_dtype=spec.param_dtype,
        remat=spec.remat,
        attention=spec.attention,
        logits_chunk=spec.logits_chunk,
        **FAMILY_SWITCHES[spec.family],
    )


def init_random_model(spec: ModelSpec, tokenizer, key: jax.Array, runtime: Runtime):
    """A random model initialised directly into its shards (no full copy on one device)."""
    config = random_model_config(spec, tokenizer)
    params = init_sharded(
        functools.partial(init_params, config), runtime.param_shardings(config), key
    )
    return config, params


def train_lm(
    stage: str,
    model_cfg: ModelConfig,
    params,
    arrays: dict[str, np.ndarray],
    section: PretrainConfig | SFTConfig,
    key: jax.Array,
    seed: int,
    logger: MetricsLogger,
    log_every: int,
    runtime: Runtime,
    checkpoints: StageCheckpoints | None = None,
    lora: LoraConfig | None = None,
    adapter_dir: Path | None = None,
    base_model: str | None = None,
):
    """Next-token training on `arrays` (input_ids, attention_mask, loss_mask) as the config
    `section` says (steps, batch size, optimizer; SFT's also names its loss). With `lora`
    naming the policy, only adapters train; the weights returned have them folded in, and
    with `lora.save_adapters` the adapters alone go to `adapter_dir` (trained on
    `base_model`)."""
    if section.steps == 0:
        return params
    loss_fn = get_loss(
        "sft", getattr(section, "loss", "default"), **getattr(section, "loss_kwargs", {})
    )
    w = stage_weights(lora or LoraConfig(), "policy", model_cfg, params, adapter_key(key), runtime)
    announce(w, stage)
    step_fn = make_sft_step(w.config, loss_fn, section.optim.grad_accum)
    state = train_section(
        stage, section, step_fn, w.trained, arrays, seed, key, logger, runtime,
        w.trained_shardings, log_every, checkpoints, frozen=w.frozen,
        frozen_shardings=w.frozen_shardings,
    )  # fmt: skip
    if adapter_dir is not None:
        save_stage_adapters(lora, w, state.params, adapter_dir, base_model)
    return w.finished(state.params, state.frozen)[1]


@functools.lru_cache(maxsize=8)
def _row_nll(model_cfg: ModelConfig):
    """Per row, the summed next-token loss of its target tokens and their count (cached per
    model, like the evaluators below)."""

    def fn(params, batch):
        logits = forward(model_cfg, params, batch["input_ids"], batch["attention_mask"])
        logps = next_token_logprobs(logits, batch["input_ids"])
        target = batch["loss_mask"][:, 1:]  # as the SFT loss: logits at t - 1 score token t
        return -jnp.sum(logps * target, axis=1), jnp.sum(target, axis=1)

    return jax.jit(fn)


def lm_loss(
    model_cfg: ModelConfig, params, arrays: dict[str, np.ndarray], batch_size: int
) -> float:
    """Mean next-token loss over every target token of `arrays` (token-weighted, every row)."""
    keys = ("input_ids", "attention_mask", "loss_mask")
    nll, tokens = map_params(_row_nll(model_cfg), params, arrays, keys, batch_size)
    return float(nll.sum() / max(tokens.sum(), 1.0))


def train_reward_model(
    cfg: Config,
    model_cfg: ModelConfig,
    trunk_params,
    train: dict[str, np.ndarray],
    key: jax.Array,
    logger: MetricsLogger,
    runtime: Runtime,
    checkpoints: StageCheckpoints | None = None,
):
    """RM = SFT trunk + a fresh scalar head, trained on K-wise rankings (with `lora.models`
    naming the reward model: adapters on the trunk and the whole head; returned folded)."""
    head_key, train_key = jax.random.split(key)
    # The SFT trunk's LM head is left behind: the RM never reads it (nor trains its moments).
    params = {"trunk": scalar_trunk(trunk_params), "head": init_scalar_head(model_cfg, head_key)}
    rm = cfg.rm
    loss_fn = get_loss("reward", rm.loss, **rm.loss_kwargs)
    w = stage_weights(
        cfg.lora, "reward", model_cfg, params, adapter_key(train_key), runtime, scalar=True
    )
    announce(w, "rm")
    step_fn = make_reward_step(w.config, loss_fn, rm.optim.grad_accum)
    state = train_section(
        "rm", rm, step_fn, w.trained, train, cfg.seed + 1, train_key, logger, runtime,
        w.trained_shardings, cfg.log.every, checkpoints, frozen=w.frozen,
        frozen_shardings=w.frozen_shardings,
    )  # fmt: skip
    return w.finished(state.params, state.frozen)[1]


def reward_accuracy(cfg: Config, model_cfg: ModelConfig, params, arrays) -> dict[str, float]:
    """Pairwise accuracy / margin over every pair of `arrays` at once (pair-weighted)."""
    keys = ("input_ids", "attention_mask")
    rewards = map_params(_rewards_fn(model_cfg), params, arrays, keys, cfg.rm.batch_size)
    loss_fn = get_loss("reward", cfg.rm.loss, **cfg.rm.loss_kwargs)
    m = loss_fn({"rewards": rewards}, arrays).metrics
    return {"accuracy": float(m["rm/accuracy"]), "margin": float(m["rm/margin"]),
            "pairs": float(m["rm/pairs"])}  # fmt: skip


def score_all(
    model_cfg: ModelConfig, params, arrays: dict[str, np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """RM score of every row of `arrays` (input_ids, attention_mask), in batches."""
    return map_params(
        _score_fn(model_cfg), params, arrays, ("input_ids", "attention_mask"), batch_size
    )


# One compiled evaluator per model: the pipeline and the comparison evaluate several weights of
# the same model, and a fresh `jax.jit` per call would compile each time.
@functools.lru_cache(maxsize=8)
def _rewards_fn(model_cfg: ModelConfig):
    return jax.jit(functools.partial(completion_rewards, model_cfg))


@functools.lru_cache(maxsize=8)
def _score_fn(model_cfg: ModelConfig):
    return jax.jit(lambda p, b: score_sequences(model_cfg, p, b["input_ids"], b["attention_mask"]))
