"""Building blocks of the decoder: norms, rotary embeddings, attention with a KV cache, MLPs.

Every weight is created through `_param`, which attaches logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`; `layers` is added by the layer scan);
activations are named with `axes.constrain` (the same names, plus `batch` and `length`).
Nothing here knows about a device mesh: `rlhf_jax.sharding` maps these names to mesh axes.

Shape letters: B batch, T query length, S key/cache length, D d_model, H heads, K kv heads,
G query heads per kv head, E head_dim, F mlp width, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.attention import KeyMask, cached_attention, self_attention
from rlhf_jax.models.axes import constrain
from rlhf_jax.models.config import ModelConfig, RopeScaling


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init, dtype) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _normal(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def flat_matmul(x: jax.Array, w: jax.Array, n_contract: int, out_dtype=None) -> jax.Array:
    """`x [..., *in] @ w [*in, *out]` as ONE 2-D matmul `[rows, prod(in)] @ [prod(in), out]`.

    Why not `einsum("btd,do->bto")`: its backward takes the weight gradient as a dot that
    contracts over both B and T, which XLA:CPU runs through extra transposes and a slower
    kernel (measured: an MLP matmul's gradient 1.5x, the LM head + loss gradient 2x slower).
    With the rows flattened every forward and backward dot is a plain GEMM. Reshapes of
    contiguous dimensions are free, and sharded rows / columns stay sharded.
    """
    in_shape, out_shape = w.shape[:n_contract], w.shape[n_contract:]
    lead = x.shape[: x.ndim - n_contract]
    k = int(np.prod(in_shape))
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out_shape)


def _lora_a_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the usual LoRA A (He-uniform with a = sqrt(5))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _adapter(
    module: nn.Module, x: jax.Array, in_shape: tuple, in_axes: tuple, out_shape: tuple,
    out_axes: tuple,
) -> jax.Array | None:  # fmt: skip
    """(alpha / r) (x A) B of this projection's LoRA adapter, or None when it has none.

    A [*in, r] and B [r, *out] (B zero at the start, so an adapted model begins as its base)
    carry the kernel's logical axes on their in / out dimensions and shard like it; the rank
    dimension is replicated. Adapters are float32 whatever the base is stored in: they are
    what trains. Only the two thin matmuls run, never a merged copy of W.
    """
    cfg = module.config
    if not cfg.has_adapter(module.name):
        return None
    r = cfg.lora_rank
    a = _param(
        module, "lora_a", (*in_shape, r), (*in_axes, None), _lora_a_init(int(np.prod(in_shape))),
        jnp.float32,
    )  # fmt: skip
    b = _param(
        module, "lora_b", (r, *out_shape), (None, *out_axes), nn.initializers.zeros, jnp.float32
    )
    xa = flat_matmul(x, a.astype(cfg.compute_dtype), len(in_shape))
    return flat_matmul(xa * jnp.asarray(cfg.lora_scale, xa.dtype), b.astype(cfg.compute_dtype), 1)


class LayerCache(NamedTuple):
    """Keys and values of one layer: [B, K, S, E] each.

    Slots after the kv-head axis, so the decode attention reads the cache as it lies (batch
    dimensions B, K major, no transpose) and a step writes its new slot in place.
    """

    k: jax.Array
    v: jax.Array


class StackedSlot(NamedTuple):
    """Layer `layer`'s place in a stacked cache: k and v [L, B, K, S, E] for all layers (the
    decode path that scans over layers, `generate(layer_scan=True)`). The layer writes its
    new slots into the stacked arrays in place and reads its own keys from them, so no
    layer's cache is ever sliced out and stacked back."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array  # scalar int32


def _write_cache(cache, k_BTKE: jax.Array, v_BTKE: jax.Array, cache_index):
    """The cache with this chunk's keys/values written at slots [cache_index, + T), in the
    [B, K, S, E] layout (one more leading layer axis for a `StackedSlot`)."""
    new = []
    for old, x in ((cache.k, k_BTKE), (cache.v, v_BTKE)):
        x = x.astype(old.dtype).transpose(0, 2, 1, 3)
        if isinstance(cache, StackedSlot):
            x = jax.lax.dynamic_update_slice(old, x[None], (cache.layer, 0, 0, cache_index, 0))
            new.append(constrain(x, None, "batch", "kv_heads", "length", "head_dim"))
        else:
            x = jax.lax.dynamic_update_slice(old, x, (0, 0, cache_index, 0))
            new.append(constrain(x, "batch", "kv_heads", "length", "head_dim"))
    if isinstance(cache, StackedSlot):
        return StackedSlot(new[0], new[1], cache.layer)
    return LayerCache(new[0], new[1])


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama, Qwen), computed in float32 as the references do."""

    config: ModelConfig
    kind: str
    dim: int
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        scale = _param(
            self, "scale", (self.dim,), (self.axis_name,), nn.initializers.ones, cfg.weight_dtype
        )
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            bias = _param(
                self,
                "bias",
                (self.dim,),
                (self.axis_name,),
                nn.initializers.zeros,
                cfg.weight_dtype,
            )
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
            return y.astype(cfg.compute_dtype)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
        # Llama casts back to the input dtype before the scale; keep that order for bf16 parity.
        return scale.astype(cfg.compute_dtype) * y.astype(cfg.compute_dtype)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None
) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, with Llama 3's wavelength-dependent scaling.

    Llama 3 (Meta's `apply_scaling`): wavelengths longer than `orig / low_freq_factor` are
    divided by `factor`, shorter than `orig / high_freq_factor` are kept, and the band between
    is interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (orig / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTNE: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate pairs (i, i + E/2) by position * frequency (the "rotate half" layout of HF)."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, E/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTNE.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNE.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention, optionally reading and writing a KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        mask: KeyMask,
        cache: LayerCache | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.config
        q = Projection(cfg, cfg.n_heads, "heads", cfg.qkv_bias, name="q")(x_BTD)
        k = Projection(cfg, cfg.n_kv_heads, "kv_heads", cfg.qkv_bias, name="k")(x_BTD)
        v = Projection(cfg, cfg.n_kv_heads, "kv_heads", cfg.qkv_bias, name="v")(x_BTD)
        # Heads split as the projections' weights are (tensor), rows as the batch: the
        # attention itself then needs no collective.
        q = constrain(q, "batch", "length", "heads", "head_dim")
        k = constrain(k, "batch", "length", "kv_heads", "head_dim")
        v = constrain(v, "batch", "length", "kv_heads", "head_dim")
        if cfg.qk_norm:
            q = Norm(cfg, "rmsnorm", cfg.head_dim, "head_dim", name="q_norm")(q)
            k = Norm(cfg, "rmsnorm", cfg.head_dim, "head_dim", name="k_norm")(k)
        if cfg.position == "rope":
            inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            q = apply_rope(q, positions_BT, inv_freq)
            k = apply_rope(k, positions_BT, inv_freq)
        new_cache = None
        if cache is None:
            out_BTHE = self_attention(q, k, v, mask, cfg.attention)
        else:
            new_cache = _write_cache(cache, k, v, cache_index)
            layer = new_cache.layer if isinstance(new_cache, StackedSlot) else None
            k_all, v_all = new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype)
            out_BTHE = cached_attention(q, k_all, v_all, mask, cfg.attention, layer=layer)
        # Without this the partitioner may feed the output projection (weight split on its
        # `embed` dimension by FSDP) with all rows gathered instead of gathering the weight.
        out_BTHE = constrain(out_BTHE, "batch", "length", "heads", "head_dim")
        out = OutProjection(cfg, name="o")(out_BTHE)
        return out, new_cache


class Projection(nn.Module):
    """x [B, T, D] -> [B, T, N, E] for the query, key or value heads."""

    config: ModelConfig
    heads: int
    heads_axis: str
    use_bias: bool

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        shape = (cfg.d_model, self.heads, cfg.head_dim)
        w = _param(
            self,
            "kernel",
            shape,
            ("embed", self.heads_axis, "head_dim"),
            _normal(cfg),
            cfg.weight_dtype,
        )
        y = flat_matmul(x_BTD, w.astype(cfg.compute_dtype), 1)
        lora = _adapter(
            self, x_BTD, shape[:1], ("embed",), shape[1:], (self.heads_axis, "head_dim")
        )
        if lora is not None:
            y = y + lora
        if self.use_bias:
            b = _param(
                self,
                "bias",
                shape[1:],
                (self.heads_axis, "head_dim"),
                nn.initializers.zeros,
                cfg.weight_dtype,
            )
            y = y + b.astype(cfg.compute_dtype)
        return y


class OutProjection(nn.Module):
    """Attention output [B, T, H, E] -> [B, T, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTHE: jax.Array) -> jax.Array:
        cfg = self.config
        w = _param(
            self,
            "kernel",
            (cfg.n_heads, cfg.head_dim, cfg.d_model),
            ("heads", "head_dim", "embed"),
            _normal(cfg),
            cfg.weight_dtype,
        )
        # Contract (h, e) in the weight's own order (flattened to h * e): `einsum("bthe,hed->btd")`
        # contracts them as (e, h), and XLA then transposes the whole weight at every call.
        y = flat_matmul(x_BTHE, w.astype(cfg.compute_dtype), 2)
        lora = _adapter(
            self, x_BTHE, w.shape[:2], ("heads", "head_dim"), (cfg.d_model,), ("embed",)
        )
        if lora is not None:
            y = y + lora
        if cfg.out_bias:
            b = _param(
                self, "bias", (cfg.d_model,), ("embed",), nn.initializers.zeros, cfg.weight_dtype
            )
            y = y + b.astype(cfg.compute_dtype)
        return y


class Dense(nn.Module):
    """A plain [in, out] matmul with optional bias and named logical axes."""

    config: ModelConfig
    features: int
    axes: tuple[str, str]
    use_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        w = _param(
            self, "kernel", (x.shape[-1], self.features), self.axes, _normal(cfg), cfg.weight_dtype
        )
        y = flat_matmul(x, w.astype(cfg.compute_dtype), 1)
        lora = _adapter(self, x, w.shape[:1], self.axes[:1], w.shape[1:], self.axes[1:])
        if lora is not None:
            y = y + lora
        if self.use_bias:
            b = _param(
                self,
                "bias",
                (self.features,),
                self.axes[1:],
                nn.initializers.zeros,
                cfg.weight_dtype,
            )
            y = y + b.astype(cfg.compute_dtype)
        return y


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


class Mlp(nn.Module):
    """GPT-2's up/act/down or the gated (SwiGLU) down(act(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        act = ACTIVATIONS[cfg.activation]
        up = Dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.mlp_bias, name="up")(x_BTD)
        if cfg.gated_mlp:
            gate = Dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.mlp_bias, name="gate")(x_BTD)
            h = act(gate) * up
        else:
            h = act(up)
        h = constrain(h, "batch", "length", "mlp")
        return Dense(cfg, cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, name="down")(h)


class Block(nn.Module):
    """One pre-norm transformer layer; the scan carries the residual stream."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, key_mask: KeyMask, cache, cache_index):
        cfg = self.config
        # The residual stream: split by rows, its model dimension whole (each layer gathers
        # its FSDP-split weights, never the other devices' rows).
        x_BTD = constrain(x_BTD, "batch", "length", "embed")
        h = Norm(cfg, cfg.norm, cfg.d_model, name="attn_norm")(x_BTD)
        attn_out, new_cache = Attention(cfg, name="attn")(
            h, positions_BT, key_mask, cache, cache_index
        )
        x_BTD = x_BTD + constrain(attn_out, "batch", "length", "embed")
        h = Norm(cfg, cfg.norm, cfg.d_model, name="mlp_norm")(x_BTD)
        x_BTD = x_BTD + constrain(Mlp(cfg, name="mlp")(h), "batch", "length", "embed")
        return x_BTD, new_cache
