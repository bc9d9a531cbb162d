"""Hugging Face checkpoint interop (safetensors, no PyTorch, no Flax models in transformers)."""

from rlhf_jax.models.hf.config_map import SUPPORTED_MODEL_TYPES, from_hf_config, to_hf_config
from rlhf_jax.models.hf.io import (
    is_reward_model,
    load_hf,
    load_scalar_model,
    load_tokenizer,
    read_hf_config,
    save_hf,
    save_scalar_model,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "from_hf_config",
    "is_reward_model",
    "load_hf",
    "load_scalar_model",
    "load_tokenizer",
    "read_hf_config",
    "save_hf",
    "save_scalar_model",
    "to_hf_config",
]
