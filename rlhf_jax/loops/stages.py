"""The supervised stages as host loops over the pure steps: LM (pretrain / SFT) and the RM,
with their evaluation helpers. The RL stage is in `loops/rl.py`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import Config, ModelSpec
from rlhf_jax.data.pack import pack_rankings
from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops.adapters import save_stage_adapters
from rlhf_jax.loops.build_supervised import SupervisedSpec, rm_spec
from rlhf_jax.loops.checks import check_rows
from rlhf_jax.loops.owned_rows import every_row
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import StageRun, run_supervised
from rlhf_jax.losses import get_loss
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig, forward, init_params, init_scalar_head, scalar_trunk
from rlhf_jax.models.config import FAMILY_SWITCHES
from rlhf_jax.ops import next_token_logprobs
from rlhf_jax.sharding import init_sharded
from rlhf_jax.steps import (
    completion_rewards,
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


def train_supervised(spec: SupervisedSpec, params, data: dict, run: StageRun):
    """`spec`'s stage from `params` (left intact) on `data`'s arrays; returns the trained
    weights as plain weights of `spec.model_cfg` (a LoRA stage's adapters folded in; with
    `lora.save_adapters` also written alone to `run.adapter_dir`, trained on
    `run.base_model`). A stage of 0 steps returns `params`."""
    if spec.section.steps == 0:
        return params
    state, w = run_supervised(spec, params, data, run)
    if run.adapter_dir is not None:
        save_stage_adapters(spec.lora, w, state.params, run.adapter_dir, run.base_model)
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

    return fn


def lm_loss(
    model_cfg: ModelConfig,
    params,
    arrays: dict[str, np.ndarray] | HeldRows,
    batch_size: int,
    runtime: Runtime | None = None,
) -> float:
    """Mean next-token loss over every target token of `arrays` (token-weighted, every row;
    `HeldRows`: each row's loss taken by its owner and gathered, loops/owned_rows.py);
    `runtime` here and below: evaluate on its mesh (None: one device, see loops/batched.py)."""
    keys = ("input_ids", "attention_mask", "loss_mask")
    fn = _row_nll(model_cfg)
    nll, tokens = every_row(fn, params, arrays, keys, batch_size, runtime)[0]
    return float(nll.sum() / max(tokens.sum(), 1.0))


def train_reward_model(
    cfg: Config,
    model_cfg: ModelConfig,
    trunk_params,
    train: dict[str, np.ndarray],
    run: StageRun,
):
    """RM = SFT trunk + a fresh scalar head, trained on K-wise rankings (with `lora.models`
    naming the reward model: adapters on the trunk and the whole head; returned folded)."""
    head_key, train_key = jax.random.split(run.key)
    # The SFT trunk's LM head is left behind: the RM never reads it (nor trains its moments).
    params = {"trunk": scalar_trunk(trunk_params), "head": init_scalar_head(model_cfg, head_key)}
    run = dataclasses.replace(run, key=train_key, adapter_dir=None)
    if cfg.rm.pack:
        train = packed_rankings(train, cfg.rm.batch_size, "rm")
    return train_supervised(rm_spec(cfg, model_cfg), params, train, run)


def packed_rankings(train: dict[str, np.ndarray], batch_size: int, section: str) -> dict:
    """`train`'s rankings packed (`data.pack_rankings`, `{section}.pack`), checked to make at
    least one batch of `{section}.batch_size` packed rows."""
    packed = pack_rankings(train)
    key = f"{section}.batch_size"
    check_rows(len(packed["input_ids"]), batch_size, key, f"the rankings packed by {section}.pack")
    return packed


def reward_accuracy(
    cfg: Config, model_cfg: ModelConfig, params, arrays, runtime: Runtime | None = None
) -> dict[str, float]:
    """Pairwise accuracy / margin over every pair of `arrays` at once (pair-weighted):
    every row's, or with `HeldRows` (several processes) every row's from the processes
    that own them (loops/owned_rows.py)."""
    keys = ("input_ids", "attention_mask")
    rewards, arrays = every_row(_rewards_fn(model_cfg), params, arrays, keys, cfg.rm.batch_size,
                                runtime)  # fmt: skip
    loss_fn = get_loss("reward", cfg.rm.loss, **cfg.rm.loss_kwargs)
    # With the whole batch's counts, as in training: the loss gets the keys it is declared
    # to get (contract.keys), not fewer after training.
    batch = {**arrays, **batch_counts("reward", loss_fn, arrays)}
    m = loss_fn({"rewards": rewards}, batch).metrics
    return {"accuracy": float(m["rm/accuracy"]), "margin": float(m["rm/margin"]),
            "pairs": float(m["rm/pairs"])}  # fmt: skip


def score_all(
    model_cfg: ModelConfig,
    params,
    arrays: dict[str, np.ndarray],
    batch_size: int = 256,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """RM score of every row of `arrays` (input_ids, attention_mask; or `HeldRows`), in
    batches."""
    keys = ("input_ids", "attention_mask")
    return every_row(_score_fn(model_cfg), params, arrays, keys, batch_size, runtime)[0]


# One evaluator per model (compiled once each by loops/batched.py): the pipeline and the
# comparison evaluate several weights of the same model, and a fresh function per call would
# compile each time.
@functools.lru_cache(maxsize=8)
def _rewards_fn(model_cfg: ModelConfig):
    return functools.partial(completion_rewards, model_cfg)


@functools.lru_cache(maxsize=8)
def _score_fn(model_cfg: ModelConfig):
    return lambda p, b: score_sequences(model_cfg, p, b["input_ids"], b["attention_mask"])
