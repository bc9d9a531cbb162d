"""The model shapes the benchmarks compare on, built locally with random weights.

Both sides of every comparison read the same Hugging Face checkpoint folder: transformers /
TRL load it with PyTorch, rlhf_jax with `load_hf`. Weights are random (no hub access), which
is fine for speed: the work per token does not depend on the values. Dropout is off.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

VOCAB = 8192  # the vocabulary for every comparison


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "gpt2" or "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None  # llama only
    mlp_dim: int | None = None  # llama only (GPT-2 uses 4 * d_model)
    vocab: int = VOCAB
    max_positions: int = 512

    def n_params(self, with_embeddings: bool = True) -> int:
        """Parameter count of the trunk + LM head (tied for GPT-2)."""
        d = self.d_model
        if self.family == "gpt2":
            per_layer = 12 * d * d + 13 * d
            emb = self.vocab * d + self.max_positions * d
        else:
            kv = (self.n_kv_heads or self.n_heads) * (d // self.n_heads)
            per_layer = 2 * d * d + 2 * d * kv + 3 * d * (self.mlp_dim or 4 * d) + 2 * d
            emb = 2 * self.vocab * d  # untied input and output embeddings
        final_norm = 2 * d if self.family == "gpt2" else d
        return self.n_layers * per_layer + final_norm + (emb if with_embeddings else 0)


GPT2_6L = Shape("gpt2 6L/512d", "gpt2", 6, 512, 8)
GPT2_12L = Shape("gpt2 12L/768d", "gpt2", 12, 768, 12)
LLAMA = Shape("llama 8L/512d gqa", "llama", 8, 512, 8, n_kv_heads=4, mlp_dim=1408)
# GPT-2's own 50,257-token vocabulary, as a new user tries it: the LM head (25.7M weights)
# outweighs the 6 layers (18.9M), so the head and the choice of token set the decode speed.
GPT2_6L_VOCAB50K = Shape("gpt2 6L/512d, vocab 50257", "gpt2", 6, 512, 8, vocab=50257)
TINY = Shape("gpt2 2L/64d (tiny)", "gpt2", 2, 64, 4, vocab=512, max_positions=256)
TINY_LLAMA = Shape("llama 2L/64d (tiny)", "llama", 2, 64, 4, n_kv_heads=2, mlp_dim=128, vocab=512)


def hf_config(shape: Shape):
    import transformers

    if shape.family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=shape.vocab,
            n_positions=shape.max_positions,
            n_embd=shape.d_model,
            n_layer=shape.n_layers,
            n_head=shape.n_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    return transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        intermediate_size=shape.mlp_dim,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def build_checkpoint(shape: Shape, folder: Path | None = None, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `shape` (config.json + model.safetensors)."""
    import torch
    import transformers

    folder = Path(folder or tempfile.mkdtemp(prefix="rlhf_jax_bench_"))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(shape))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_torch(folder: Path, for_training: bool = False):
    """The PyTorch model (fp32, eager attention off by default: transformers' own choice)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train(for_training)
    return model


def load_jax(folder: Path):
    """(ModelConfig, params) for rlhf_jax."""
    from rlhf_jax.models import load_hf

    return load_hf(folder)
