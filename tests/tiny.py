"""Tiny random models built in-process (no Hugging Face files) for fast unit tests."""

import jax

from rlhf_jax.models import ModelConfig, init_params


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        model_type="llama",
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        mlp_dim=48,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    base.update(changes)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **changes):
    config = tiny_config(**changes)
    return config, init_params(config, jax.random.key(seed))
