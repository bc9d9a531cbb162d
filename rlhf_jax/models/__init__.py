"""The decoder family (GPT-2, Llama 2/3, Qwen2/2.5, Qwen3), scalar heads and HF interop."""

from rlhf_jax.models.config import ModelConfig, RopeScaling
from rlhf_jax.models.heads import (
    init_scalar_head,
    last_token_index,
    reward_token_index,
    scalar_forward,
    scalar_head,
    scalar_model_logical_axes,
    scalar_trunk,
    value_at_last_token,
)
from rlhf_jax.models.hf import (
    load_hf,
    load_scalar_model,
    load_tokenizer,
    save_hf,
    save_scalar_model,
)
from rlhf_jax.models.transformer import (
    KVCache,
    forward,
    forward_cached,
    hidden_states,
    init_cache,
    init_params,
    lm_logits,
    param_logical_axes,
    param_shapes,
    positions_from_mask,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "forward",
    "forward_cached",
    "hidden_states",
    "init_cache",
    "init_params",
    "init_scalar_head",
    "last_token_index",
    "lm_logits",
    "load_hf",
    "load_scalar_model",
    "load_tokenizer",
    "param_logical_axes",
    "param_shapes",
    "positions_from_mask",
    "reward_token_index",
    "save_hf",
    "save_scalar_model",
    "scalar_forward",
    "scalar_head",
    "scalar_model_logical_axes",
    "scalar_trunk",
    "value_at_last_token",
]
