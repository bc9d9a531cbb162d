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


def tiny_hf_checkpoint(folder):
    """A tiny random Hugging Face checkpoint at `folder`, with its own small tokenizer (pad and
    EOS distinct): `(folder, tokenizer)`."""
    from pathlib import Path

    from rlhf_jax.models import save_hf
    from rlhf_jax.tasks.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        ["the red fox runs near the river.", "a calm owl sings."] * 20, vocab_size=300
    )
    config = tiny_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_hf(config, init_params(config, jax.random.key(0)), folder, tokenizer)
    return Path(folder), tokenizer


def tiny_sft_inputs(folder):
    """`(model folder, demonstrations file)` for a real `rlhf-jax sft` run in a few seconds:
    `tiny_hf_checkpoint` and 16 rows."""
    import json
    from pathlib import Path

    folder = Path(folder)
    model, _ = tiny_hf_checkpoint(folder / "model")
    demos = folder / "demos.jsonl"
    row = {"prompt": "the red fox", "completion": " runs near the river."}
    demos.write_text((json.dumps(row) + "\n") * 16)
    return model, demos
