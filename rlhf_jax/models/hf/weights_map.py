"""Where each of our parameters lives in a Hugging Face checkpoint, in both directions.

Our layout stacks layers on a leading axis and splits heads: q kernel [L, D, H, E],
o kernel [L, H, E, D], MLP kernels [L, in, out]. PyTorch `nn.Linear` stores [out, in];
GPT-2's `Conv1D` stores [in, out] and fuses q, k, v into one `c_attn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from rlhf_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Source:
    """One parameter of ours: the HF tensor it comes from and how to convert it.

    `hf_name` holds `{i}` for per-layer tensors; those are converted one layer at a time and
    stacked, so a shard of layers can be read without the rest.
    """

    hf_name: str
    convert: Callable[[np.ndarray], np.ndarray]
    per_layer: bool = True


def _t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _llama_sources(cfg: ModelConfig) -> dict[Path, Source]:
    d, e, h, k = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    layer = "model.layers.{i}."
    s: dict[Path, Source] = {
        ("embed",): Source("model.embed_tokens.weight", np.asarray, per_layer=False),
        ("final_norm", "scale"): Source("model.norm.weight", np.asarray, per_layer=False),
        ("layers", "attn_norm", "scale"): Source(layer + "input_layernorm.weight", np.asarray),
        ("layers", "mlp_norm", "scale"): Source(
            layer + "post_attention_layernorm.weight", np.asarray
        ),
        ("layers", "attn", "q", "kernel"): Source(
            layer + "self_attn.q_proj.weight", lambda w: _t(w).reshape(d, h, e)
        ),
        ("layers", "attn", "k", "kernel"): Source(
            layer + "self_attn.k_proj.weight", lambda w: _t(w).reshape(d, k, e)
        ),
        ("layers", "attn", "v", "kernel"): Source(
            layer + "self_attn.v_proj.weight", lambda w: _t(w).reshape(d, k, e)
        ),
        ("layers", "attn", "o", "kernel"): Source(
            layer + "self_attn.o_proj.weight", lambda w: _t(w).reshape(h, e, d)
        ),
        ("layers", "mlp", "gate", "kernel"): Source(layer + "mlp.gate_proj.weight", _t),
        ("layers", "mlp", "up", "kernel"): Source(layer + "mlp.up_proj.weight", _t),
        ("layers", "mlp", "down", "kernel"): Source(layer + "mlp.down_proj.weight", _t),
    }
    if cfg.qkv_bias:
        s[("layers", "attn", "q", "bias")] = Source(
            layer + "self_attn.q_proj.bias", lambda b: b.reshape(h, e)
        )
        for name in ("k", "v"):
            s[("layers", "attn", name, "bias")] = Source(
                layer + f"self_attn.{name}_proj.bias", lambda b: b.reshape(k, e)
            )
    if cfg.out_bias:
        s[("layers", "attn", "o", "bias")] = Source(layer + "self_attn.o_proj.bias", np.asarray)
    if cfg.mlp_bias:
        for name in ("gate", "up", "down"):
            s[("layers", "mlp", name, "bias")] = Source(layer + f"mlp.{name}_proj.bias", np.asarray)
    if cfg.qk_norm:
        s[("layers", "attn", "q_norm", "scale")] = Source(
            layer + "self_attn.q_norm.weight", np.asarray
        )
        s[("layers", "attn", "k_norm", "scale")] = Source(
            layer + "self_attn.k_norm.weight", np.asarray
        )
    if not cfg.tie_embeddings:
        s[("lm_head",)] = Source("lm_head.weight", _t, per_layer=False)
    return s


def _gpt2_sources(cfg: ModelConfig, prefix: str) -> dict[Path, Source]:
    d, e, h = cfg.d_model, cfg.head_dim, cfg.n_heads
    layer = prefix + "h.{i}."

    def qkv(j: int, is_bias: bool):
        if is_bias:
            return lambda b: b[j * d : (j + 1) * d].reshape(h, e)
        return lambda w: np.ascontiguousarray(w[:, j * d : (j + 1) * d]).reshape(d, h, e)

    s: dict[Path, Source] = {
        ("embed",): Source(prefix + "wte.weight", np.asarray, per_layer=False),
        ("pos_embed",): Source(prefix + "wpe.weight", np.asarray, per_layer=False),
        ("final_norm", "scale"): Source(prefix + "ln_f.weight", np.asarray, per_layer=False),
        ("final_norm", "bias"): Source(prefix + "ln_f.bias", np.asarray, per_layer=False),
        ("layers", "attn", "o", "kernel"): Source(
            layer + "attn.c_proj.weight", lambda w: w.reshape(h, e, d)
        ),
        ("layers", "attn", "o", "bias"): Source(layer + "attn.c_proj.bias", np.asarray),
        ("layers", "mlp", "up", "kernel"): Source(layer + "mlp.c_fc.weight", np.asarray),
        ("layers", "mlp", "up", "bias"): Source(layer + "mlp.c_fc.bias", np.asarray),
        ("layers", "mlp", "down", "kernel"): Source(layer + "mlp.c_proj.weight", np.asarray),
        ("layers", "mlp", "down", "bias"): Source(layer + "mlp.c_proj.bias", np.asarray),
    }
    for norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        for leaf in ("weight", "bias"):
            s[("layers", norm, "scale" if leaf == "weight" else "bias")] = Source(
                layer + f"{hf_norm}.{leaf}", np.asarray
            )
    for j, name in enumerate(("q", "k", "v")):
        s[("layers", "attn", name, "kernel")] = Source(layer + "attn.c_attn.weight", qkv(j, False))
        s[("layers", "attn", name, "bias")] = Source(layer + "attn.c_attn.bias", qkv(j, True))
    if not cfg.tie_embeddings:
        s[("lm_head",)] = Source("lm_head.weight", _t, per_layer=False)
    return s


def hf_sources(cfg: ModelConfig, tensor_names: set[str]) -> dict[Path, Source]:
    """Sources for every parameter; GPT-2 files come with or without the `transformer.` prefix."""
    if cfg.model_type == "gpt2":
        prefix = "transformer." if "transformer.wte.weight" in tensor_names else ""
        return _gpt2_sources(cfg, prefix)
    return _llama_sources(cfg)


def to_hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our (host, NumPy) parameters as a flat dict of HF tensor names, in PyTorch layouts."""
    out: dict[str, np.ndarray] = {}
    layers = params["layers"]
    if cfg.model_type == "gpt2":
        p = "transformer."
        out[p + "wte.weight"] = params["embed"]
        out[p + "wpe.weight"] = params["pos_embed"]
        out[p + "ln_f.weight"] = params["final_norm"]["scale"]
        out[p + "ln_f.bias"] = params["final_norm"]["bias"]
        attn, mlp = layers["attn"], layers["mlp"]
        d = cfg.d_model
        for i in range(cfg.n_layers):
            q = f"{p}h.{i}."
            out[q + "ln_1.weight"] = layers["attn_norm"]["scale"][i]
            out[q + "ln_1.bias"] = layers["attn_norm"]["bias"][i]
            out[q + "ln_2.weight"] = layers["mlp_norm"]["scale"][i]
            out[q + "ln_2.bias"] = layers["mlp_norm"]["bias"][i]
            out[q + "attn.c_attn.weight"] = np.concatenate(
                [attn[n]["kernel"][i].reshape(d, -1) for n in ("q", "k", "v")], axis=1
            )
            out[q + "attn.c_attn.bias"] = np.concatenate(
                [attn[n]["bias"][i].reshape(-1) for n in ("q", "k", "v")]
            )
            out[q + "attn.c_proj.weight"] = attn["o"]["kernel"][i].reshape(-1, d)
            out[q + "attn.c_proj.bias"] = attn["o"]["bias"][i]
            out[q + "mlp.c_fc.weight"] = mlp["up"]["kernel"][i]
            out[q + "mlp.c_fc.bias"] = mlp["up"]["bias"][i]
            out[q + "mlp.c_proj.weight"] = mlp["down"]["kernel"][i]
            out[q + "mlp.c_proj.bias"] = mlp["down"]["bias"][i]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = _t(params["lm_head"])
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    # Llama-like: invert each Source's layout change.
    for path, src in _llama_sources(cfg).items():
        value = params
        for key in path:
            value = value[key]
        if not src.per_layer:
            out[src.hf_name] = _t(value) if path == ("lm_head",) else value
            continue
        for i in range(cfg.n_layers):
            w = value[i]
            if path[-1] == "kernel":
                if path[-2] == "o":
                    w = _t(w.reshape(-1, cfg.d_model))
                elif path[-2] in ("q", "k", "v"):
                    w = _t(w.reshape(cfg.d_model, -1))
                else:
                    w = _t(w)
            elif path[-1] == "bias":
                w = w.reshape(-1)
            out[src.hf_name.format(i=i)] = w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
