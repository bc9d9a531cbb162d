"""Hugging Face `config.json` <-> ModelConfig for the supported families.

Anything a family's config can switch on that this transformer does not implement is refused
with a message naming the field, rather than loaded into a model with different logits.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3")


def _refuse_if(cond: bool, model_type: str, what: str) -> None:
    if cond:
        raise RlhfJaxError(f"model_type '{model_type}': {what} is not supported")


def _rope(d: dict[str, Any], model_type: str) -> tuple[float, RopeScaling | None]:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    merged = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    _refuse_if(
        float(merged.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0,
        model_type,
        "partial_rotary_factor != 1",
    )
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, RopeScaling(
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    raise RlhfJaxError(
        f"model_type '{model_type}': rope type '{rope_type}' is not supported "
        "(supported: default, llama3)"
    )


def _token_ids(d: dict[str, Any]) -> dict[str, Any]:
    eos = d.get("eos_token_id")
    return {
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
        "pad_token_id": d.get("pad_token_id"),
    }


def _from_gpt2(d: dict[str, Any]) -> ModelConfig:
    _refuse_if(
        d.get("scale_attn_by_inverse_layer_idx", False),
        "gpt2",
        "scale_attn_by_inverse_layer_idx=true",
    )
    _refuse_if(not d.get("scale_attn_weights", True), "gpt2", "scale_attn_weights=false")
    _refuse_if(d.get("add_cross_attention", False), "gpt2", "add_cross_attention=true")
    d_model = d["n_embd"]
    return ModelConfig(
        model_type="gpt2",
        vocab_size=d["vocab_size"],
        d_model=d_model,
        n_layers=d["n_layer"],
        n_heads=d["n_head"],
        n_kv_heads=d["n_head"],
        head_dim=d_model // d["n_head"],
        mlp_dim=d.get("n_inner") or 4 * d_model,
        max_position_embeddings=d["n_positions"],
        norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=d.get("activation_function", "gelu_new"),
        gated_mlp=False,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=d.get("tie_word_embeddings", True),
        initializer_range=d.get("initializer_range", 0.02),
        **_token_ids(d),
    )


def _from_llama_like(d: dict[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    _refuse_if(bool(d.get("use_sliding_window", False)), model_type, "use_sliding_window=true")
    _refuse_if(
        d.get("hidden_act", "silu") not in ("silu", "gelu", "relu", "gelu_new"),
        model_type,
        f"hidden_act '{d.get('hidden_act')}'",
    )
    _refuse_if(d.get("pretraining_tp", 1) != 1, model_type, "pretraining_tp != 1")
    theta, scaling = _rope(d, model_type)
    n_heads = d["num_attention_heads"]
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        mlp_dim=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=d.get("hidden_act", "silu"),
        gated_mlp=True,
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases and no output bias; Llama and Qwen3 put
        # `attention_bias` on all four projections.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        out_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=d.get("initializer_range", 0.02),
        **_token_ids(d),
    )


def from_hf_config(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed Hugging Face config dict; `source` names the file in errors."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RlhfJaxError(
            f"{source}: model_type '{model_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        return _from_gpt2(d) if model_type == "gpt2" else _from_llama_like(d)
    except KeyError as e:
        raise RlhfJaxError(
            f"{source}: field {e.args[0]!r} is missing for model_type '{model_type}'"
        ) from None
    except RlhfJaxError as e:  # a feature we do not implement: say which file asks for it
        raise RlhfJaxError(f"{source}: {e}") from None


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads into the equivalent PyTorch model."""
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    common = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.model_type == "gpt2":
        return {
            **common,
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_position_embeddings,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": cfg.activation,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    out = {
        **common,
        "architectures": [arch[cfg.model_type]],
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": cfg.activation,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "mlp_bias": cfg.mlp_bias,
    }
    if cfg.model_type != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    return out
