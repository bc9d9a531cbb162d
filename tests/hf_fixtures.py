"""Tiny Hugging Face checkpoints with random weights, built locally (no hub access).

`make_tiny_checkpoint(family, path)` writes a folder that `transformers` and `rlhf_jax.load_hf`
both read: config.json + model.safetensors (or shards + model.safetensors.index.json).

The models are small enough for a CPU test run and use a large `initializer_range` (0.2) so
logits are peaked: greedy argmax then has comfortable margins between the top two tokens, and a
greedy comparison between two implementations is not decided by float rounding.

Imports torch and transformers lazily so that merely importing this module stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")
ROPE_FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB = 97
INIT_RANGE = 0.2

# Llama 3 RoPE scaling chosen so that all three regimes of the scaling are used with
# head_dim 16 and theta 5e5: the wavelengths of the 8 frequencies are about
# 6.3, 32.5, 168, 873, ... With original_max_position_embeddings 64, low 1, high 4 the
# boundaries are 16 and 64: frequency 0 is kept, frequency 1 is smoothly interpolated,
# frequencies 2..7 are divided by `factor` (see `llama3_inverse_frequencies` below).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
LLAMA_THETA = 500000.0
QWEN_THETA = 1000000.0


def _hf_config(family: str):
    import transformers

    common = dict(vocab_size=VOCAB, initializer_range=INIT_RANGE)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    llama_like = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
        attention_dropout=0.0,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(
            tie_word_embeddings=False,
            rope_parameters={"rope_theta": LLAMA_THETA, **LLAMA3_ROPE},
            **llama_like,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": QWEN_THETA},
            **llama_like,
        )
    if family == "qwen3":
        return transformers.Qwen3Config(
            head_dim=32,  # != hidden_size / num_attention_heads = 16
            tie_word_embeddings=True,
            use_sliding_window=False,
            attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": QWEN_THETA},
            **llama_like,
        )
    raise ValueError(f"unknown family {family!r}")


def build_hf_model(family: str, seed: int = 0):
    """A randomly initialised transformers CausalLM of the family, in eval mode, float32."""
    import torch
    import transformers

    config = _hf_config(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    model = model.float().eval()
    if family == "qwen2":
        # Qwen2 initialises the q/k/v biases to zero; make them non-zero so the test would
        # notice biases that are dropped or mis-reshaped on load.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, INIT_RANGE)
    if family in ("llama", "qwen2", "qwen3"):
        # Norm scales initialise to exactly 1; perturb them so a missing scale is visible.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(torch.randn_like(p) * 0.1)
    if family == "gpt2":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ln_" in name or "ln_f" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def make_tiny_checkpoint(
    family: str,
    path: str | Path,
    seed: int = 0,
    *,
    sharded: bool = False,
    old_rope_style: bool = False,
) -> Path:
    """Write a tiny random checkpoint folder of `family` to `path` and return the path.

    sharded: save with a small `max_shard_size`, so that several safetensors files and a
      `model.safetensors.index.json` are written.
    old_rope_style: rewrite config.json the way transformers 4.x wrote it: top-level
      `rope_theta` and a `rope_scaling` dict (or null) instead of transformers 5's
      `rope_parameters`. Same weights as the default style for the same seed.
    """
    path = Path(path)
    model = build_hf_model(family, seed)
    kwargs = {"max_shard_size": "60KB"} if sharded else {}
    model.save_pretrained(str(path), **kwargs)
    if sharded:
        assert (path / "model.safetensors.index.json").is_file(), sorted(
            p.name for p in path.iterdir()
        )
        assert len(list(path.glob("model-*.safetensors"))) > 1
    else:
        assert (path / "model.safetensors").is_file(), sorted(p.name for p in path.iterdir())
    if old_rope_style:
        if family not in ROPE_FAMILIES:
            raise ValueError(f"{family} has no RoPE config to rewrite")
        _rewrite_rope_old_style(path / "config.json")
    return path


def _rewrite_rope_old_style(config_file: Path) -> None:
    data = json.loads(config_file.read_text())
    rope = dict(data.pop("rope_parameters"))
    data["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.get("rope_type", "default")
    data["rope_scaling"] = None if rope_type == "default" else rope
    data.pop("transformers_version", None)
    data["transformers_version"] = "4.46.0"
    config_file.write_text(json.dumps(data, indent=2) + "\n")


def load_hf_torch(path: str | Path):
    """transformers' own model for a checkpoint folder: float32, eager attention, eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def torch_logits(model, input_ids, attention_mask=None):
    """Logits [B, T, V] of a transformers model as float32 NumPy.

    For padded rows, position ids are derived from the mask the way transformers' `generate`
    does (count of real tokens before each position), so left padding does not shift them.
    """
    import numpy as np
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return out.logits.float().numpy()


def llama3_inverse_frequencies(head_dim: int = 16):
    """Reference inverse frequencies (NumPy float64) with and without LLAMA3_ROPE scaling."""
    import numpy as np

    base = 1.0 / LLAMA_THETA ** (np.arange(0, head_dim, 2) / head_dim)
    factor = LLAMA3_ROPE["factor"]
    low, high = LLAMA3_ROPE["low_freq_factor"], LLAMA3_ROPE["high_freq_factor"]
    orig = LLAMA3_ROPE["original_max_position_embeddings"]
    wavelen = 2 * np.pi / base
    scaled = np.where(wavelen > orig / low, base / factor, base)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return base, np.where(medium, smoothed, scaled)
