"""The one configuration that describes every supported decoder family.

GPT-2, Llama 2/3/3.x, Qwen2/2.5 and Qwen3 differ only in a handful of switches (norm type,
position encoding, gated MLP, biases, q/k norms, head size), so one transformer expresses them
all. Conversions to and from Hugging Face `config.json` live in `models/hf/config_map.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from rlhf_jax.errors import RlhfJaxError

# The implementations `models/attention.py` dispatches to (kept here: attention imports this).
ATTENTION_KINDS = ("auto", "dense", "blocked", "cudnn", "splash")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# The projections an adapter can sit on (the module names in `models/layers.py`): attention
# query, key, value and output; the MLP's gate, up and down (GPT-2 has no gate).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (`rope_type: llama3` in Hugging Face configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer.

    Frozen and hashable so it can be a static argument of `jax.jit`.
    """

    model_type: str  # the Hugging Face family name, kept for `save_hf`
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    head_dim: int
    mlp_dim: int
    max_position_embeddings: int
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    activation: Literal["gelu_new", "silu", "gelu", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU-style gate * up projection
    position: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys before RoPE
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # computation dtype
    param_dtype: str = "float32"  # storage dtype of the weights
    remat: bool = False  # recompute each layer's activations in the backward pass
    # Attention implementation (`models/attention.py`): auto | dense | blocked | cudnn |
    # splash. Not part of the checkpoint's config.json.
    attention: str = "auto"
    # Tokens per chunk when log-probs are taken from the LM head chunk by chunk, never holding
    # the [tokens, vocab] float32 logits (`models.token_stats`): None = automatic (chunked
    # when one call's logits would reach 1 GiB), 0 = never. Not part of config.json.
    logits_chunk: int | None = None
    initializer_range: float = 0.02
    # Low-rank adapters (LoRA, Hu et al. 2021) on the projections named in `lora_targets`:
    # each gains `lora_a` [*in, r] and `lora_b` [r, *out] and computes
    # x W + (alpha / r) (x A) B. rank 0: none. Not part of the checkpoint's config.json.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise RlhfJaxError(
                    f"model config field '{name}': {getattr(self, name)!r} is not one of "
                    f"{sorted(DTYPES)}"
                )
        if self.attention not in ATTENTION_KINDS:
            raise RlhfJaxError(
                f"model config field 'attention': {self.attention!r} is not one of "
                f"{list(ATTENTION_KINDS)}"
            )
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise RlhfJaxError(
                f"LoRA targets {sorted(unknown)} are not projections of the model (one of "
                f"{list(LORA_TARGETS)})"
            )
        if self.n_heads % self.n_kv_heads:
            raise RlhfJaxError(
                f"model config: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )

    @property
    def lora_scale(self) -> float:
        """alpha / rank: what the adapters' product is multiplied by."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def has_adapter(self, projection: str) -> bool:
        return self.lora_rank > 0 and projection in self.lora_targets

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids as a tuple (Llama 3 configs list several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# The switches that make a ModelConfig one of the supported families (for random models;
# checkpoints get theirs from config.json).
FAMILY_SWITCHES: dict[str, dict] = {
    "gpt2": dict(
        norm="layernorm",
        norm_eps=1e-5,
        activation="gelu_new",
        gated_mlp=False,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
    ),
    "llama": dict(norm="rmsnorm", activation="silu", gated_mlp=True, position="rope"),
    "qwen2": dict(
        norm="rmsnorm", activation="silu", gated_mlp=True, position="rope", qkv_bias=True
    ),
    "qwen3": dict(norm="rmsnorm", activation="silu", gated_mlp=True, position="rope", qk_norm=True),
}
