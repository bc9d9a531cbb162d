"""The weights a stage trains and the ones it only reads: all of a model's, or (with the
`lora` config section naming it) fresh LoRA adapters on a frozen base."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from rlhf_jax.config import LoraConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf.adapters import save_adapters
from rlhf_jax.models.lora import (
    count_params,
    fold_adapters,
    init_adapters,
    merge_trees,
    split_adapters,
    with_lora,
)


@dataclasses.dataclass
class StageWeights:
    """config: the model config the stage's steps run (adapted under LoRA); trained / frozen:
    the weights the optimizer updates / never sees (frozen None without LoRA), with their
    shardings."""

    config: ModelConfig
    trained: Any
    trained_shardings: Any
    frozen: Any = None
    frozen_shardings: Any = None

    def finished(self, trained: Any, frozen: Any = None) -> tuple[ModelConfig, Any]:
        """`(base config, plain weights)` after training: the adapters folded into the base,
        so the result saves, evaluates and starts the next stage like any model."""
        frozen = self.frozen if frozen is None else frozen
        return fold_adapters(self.config, merge_trees(frozen, trained))


def adapts(lora: LoraConfig, model: str) -> bool:
    """Whether `model` ("policy", "reward" or "critic") trains LoRA adapters."""
    return lora.rank > 0 and model in lora.models


def stage_weights(
    lora: LoraConfig,
    model: str,
    model_cfg: ModelConfig,
    params: Any,
    key: jax.Array,
    runtime: Runtime,
    scalar: bool = False,
) -> StageWeights:
    """What a stage training `model` ("policy", "reward" or "critic") trains. `params` is the
    model's weights (`{"trunk", "head"}` when `scalar`); under LoRA they become the frozen
    base (a scalar model's head still trains in full) and `key` draws the adapters."""
    if lora.save_adapters and model == "policy" and model_cfg.model_type == "gpt2":
        raise RlhfJaxError(  # said before training, not after
            "config key 'lora.save_adapters': GPT-2's attention is one fused c_attn matrix in "
            "transformers, which separate q/k/v adapters do not map onto; the merged weights "
            "are always written (set lora.save_adapters=false)"
        )
    if not adapts(lora, model):
        shardings = runtime.param_shardings(model_cfg, scalar=scalar)
        return StageWeights(model_cfg, params, shardings)
    cfg = with_lora(model_cfg, lora.rank, lora.alpha, lora.targets)
    base_sh, adapter_sh = split_adapters(runtime.param_shardings(cfg, scalar=scalar))
    if not scalar:
        adapters = init_adapters(cfg, key, adapter_sh)
        return StageWeights(cfg, adapters, adapter_sh, params, base_sh)
    adapters = init_adapters(cfg, key, adapter_sh["trunk"])
    return StageWeights(
        cfg,
        {"trunk": adapters, "head": params["head"]},
        {"trunk": adapter_sh["trunk"], "head": base_sh["head"]},
        {"trunk": params["trunk"]},
        {"trunk": base_sh["trunk"]},
    )


def save_stage_adapters(
    lora: LoraConfig, weights: StageWeights, trained: Any, folder, base_model=None
) -> None:
    """With `lora.save_adapters`, the trained adapters alone (PEFT's layout) in `folder`;
    `trained` may hold more (a value head), which is left out."""
    if lora.save_adapters and weights.frozen is not None:
        save_adapters(weights.config, split_adapters(trained)[1], folder, base_model)


def adapter_key(stage_key: jax.Array, model: int = 0) -> jax.Array:
    """The key a stage's `model`-th adapters are drawn with: one no step of the stage reaches
    (step i takes `fold_in(stage_key, i)`)."""
    return jax.random.fold_in(stage_key, 2**31 - 2 - model)


def announce(weights: StageWeights, stage: str) -> None:
    """One line on what a LoRA stage trains (process 0; nothing for full fine-tuning)."""
    if weights.frozen is None or jax.process_index() != 0:
        return
    n_trained, n_frozen = count_params(weights.trained), count_params(weights.frozen)
    cfg = weights.config
    print(
        f"{stage}: LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha:g}) on "
        f"{', '.join(cfg.lora_targets)}: training {n_trained:,} parameters, {n_frozen:,} "
        f"frozen ({100 * n_trained / (n_trained + n_frozen):.2f}% trained)"
    )
