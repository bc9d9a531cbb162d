"""The decoder and its functional API: parameters are plain pytrees, every call is pure.

`forward(config, params, input_ids, attention_mask)` is all most callers need. Generation uses
`init_cache` + `forward_cached`, which read and write a preallocated KV cache.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.attention import KeyMask
from rlhf_jax.models.axes import constrain
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import (
    Block,
    LayerCache,
    Norm,
    StackedSlot,
    _normal,
    _param,
    flat_matmul,
)

# Cache of all layers: one LayerCache per layer (separate buffers, so a decode step updates
# each in place), k and v of shape [B, K, S, E]; or, for the layer-scan decode path, ONE
# LayerCache whose k and v are stacked [L, B, K, S, E] (updated in place too).
KVCache = tuple[LayerCache, ...] | LayerCache


class Decoder(nn.Module):
    """Token embedding, a scan over identical layers, final norm and (optionally) the LM head."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids_BT: jax.Array,
        positions_BT: jax.Array,
        mask: KeyMask,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        return_hidden: bool = False,
        logits_index_B: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        embedding = _param(
            self,
            "embed",
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            _normal(cfg),
            cfg.weight_dtype,
        )
        x = jnp.take(embedding, input_ids_BT, axis=0).astype(cfg.compute_dtype)
        if cfg.position == "learned":
            pos_table = _param(
                self,
                "pos_embed",
                (cfg.max_position_embeddings, cfg.d_model),
                ("position", "embed"),
                _normal(cfg),
                cfg.weight_dtype,
            )
            x = x + jnp.take(pos_table, positions_BT, axis=0).astype(cfg.compute_dtype)
        x = constrain(x, "batch", "length", "embed")

        if cache is None:
            # Each layer body is checkpointed. remat=False keeps every matmul output for the
            # backward and recomputes only the cheap elementwise ops (norms, GELU, softmax):
            # fewer per-layer residuals to stack in the scan and read back, which measured
            # 17% faster than saving everything for a 6L/512d SFT step on CPU, and uses less
            # memory. remat=True recomputes the whole layer (least memory).
            policy = None if cfg.remat else jax.checkpoint_policies.dots_saveable
            block = nn.remat(Block, prevent_cse=False, policy=policy)
            # One compiled layer body for all layers: compile time does not grow with depth.
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            x, new_cache = layers(x, positions_BT, mask, cache, cache_index)
        else:
            x, new_cache = _cached_layers(
                cfg,
                self.variables["params"]["layers"],
                x,
                positions_BT,
                mask,
                cache,
                cache_index,
            )
        x = Norm(cfg, cfg.norm, cfg.d_model, name="final_norm")(x)
        if logits_index_B is not None:  # only these tokens' logits (e.g. a prompt's last)
            x = jnp.take_along_axis(x, logits_index_B[:, None, None], axis=1)
        x = constrain(x, "batch", "length", "embed")
        if return_hidden:
            return x, new_cache
        if cfg.tie_embeddings:
            head = embedding.T
        else:
            head = _param(
                self,
                "lm_head",
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                _normal(cfg),
                cfg.weight_dtype,
            )
        return _head(cfg, x, head), new_cache


def _head(cfg: ModelConfig, h_BTD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] (log-probs and the loss need the range whatever the compute
    dtype), split by rows and, under tensor parallelism, by vocabulary: the largest
    activation of the model is never gathered across the batch."""
    logits = flat_matmul(h_BTD, head_DV.astype(cfg.compute_dtype), 1, out_dtype=jnp.float32)
    return constrain(logits, "batch", "length", "vocab")


def split_layers(params):
    """`params` with the stacked `layers` weights ([L, ...] leaves) split into a tuple of
    per-layer trees. Generation does this once before its decode loop, so no step slices
    (copies) the weights; `forward_cached` takes either form."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return params
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(n))}


def _cached_layers(cfg, layer_params, x_BTD, positions_BT, mask, cache, cache_index):
    """The layers one after another (unrolled, not scanned) over a per-layer KV cache.

    Unrolled so that every layer's cache is its own buffer, read by the attention and
    updated in place (a scan that took each layer's cache as its own slice would copy it
    out and stack the results again: copies of the whole cache at every step). A stacked
    cache (`init_cache(stacked=True)`) takes `_scanned_layers` instead.
    """
    if isinstance(cache, LayerCache):
        return _scanned_layers(cfg, layer_params, x_BTD, positions_BT, mask, cache, cache_index)
    if not isinstance(layer_params, tuple):
        layer_params = split_layers({"layers": layer_params})["layers"]
    block = Block(cfg)
    new_cache = []
    for p, c in zip(layer_params, cache, strict=True):
        x_BTD, c = block.apply({"params": p}, x_BTD, positions_BT, mask, c, cache_index)
        new_cache.append(c)
    return x_BTD, tuple(new_cache)


def _scanned_layers(cfg, layer_params, x_BTD, positions_BT, mask, cache, cache_index):
    """The layers as a `lax.scan` over the stacked weights ([L, ...] leaves), carrying the
    stacked cache [L, B, K, S, E]: each layer writes its new slots into it in place and
    reads its own keys from it (`layers.StackedSlot`), so no whole-cache copy is made.

    The scan reads each layer's weights as a slice of the stacked ones: at most one layer's
    slice at a time, instead of the per-layer copies of every weight that the unrolled path
    needs (`split_layers`) for the whole call. XLA:CPU copies that slice at every step,
    which costs decode time (docs/memory.md, "Fitting 80 GB").
    """
    block = Block(cfg)
    n = jax.tree.leaves(layer_params)[0].shape[0]

    def body(carry, xs):
        x, k, v = carry
        p, layer = xs
        x, new = block.apply(
            {"params": p}, x, positions_BT, mask, StackedSlot(k, v, layer), cache_index
        )
        return (x, new.k, new.v), None

    xs = (layer_params, jnp.arange(n, dtype=jnp.int32))
    (x_BTD, k, v), _ = jax.lax.scan(body, (x_BTD, cache.k, cache.v), xs)
    return x_BTD, LayerCache(k, v)


def cache_batch_axis(cache: KVCache) -> int:
    """The batch axis of a cache's arrays: 0 per layer, 1 when stacked [L, B, K, S, E]."""
    return 1 if isinstance(cache, LayerCache) else 0


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Position of each token counted over real tokens only (left padding gets position 0)."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token from the start of its segment (packed rows; 0 = padding)."""
    seg = segment_ids_BT.astype(jnp.int32)
    t = jnp.arange(seg.shape[-1])
    previous = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    start = jax.lax.cummax(jnp.where(seg != previous, t, 0), axis=1)
    return jnp.where(seg > 0, t - start, 0)


def _apply(config, params, input_ids, attention_mask, segment_ids, return_hidden):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    if segment_ids is None:
        positions = positions_from_mask(attention_mask)
    else:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        positions = segment_positions(segment_ids)
    out, _ = Decoder(config).apply(
        {"params": params},
        input_ids,
        positions,
        KeyMask(attention_mask, 0, segment_ids),
        return_hidden=return_hidden,
    )
    return out


def forward(
    config: ModelConfig,
    params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, V] (float32) of a padded batch; left- or right-padded rows both work.

    `segment_ids` ([B, T], 1, 2, ... per packed sequence, 0 padding) keeps packed sequences
    from attending to each other and restarts positions at each one.
    """
    return _apply(config, params, input_ids, attention_mask, segment_ids, return_hidden=False)


def hidden_states(
    config: ModelConfig,
    params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D]: the trunk output that scalar heads read."""
    return _apply(config, params, input_ids, attention_mask, segment_ids, return_hidden=True)


def lm_logits(config: ModelConfig, params, h_BTD: jax.Array) -> jax.Array:
    """The LM head applied to hidden states from `hidden_states` (float32 logits [B, T, V]).

    For callers that need logits at some positions only (PPO's response tokens): slice the
    hidden states first and the head, the largest matmul per token, skips the rest."""
    head_DV = params["embed"].T if config.tie_embeddings else params["lm_head"]
    h_BTD = constrain(h_BTD, "batch", "length", "embed")
    return _head(config, h_BTD, head_DV)


def init_cache(
    config: ModelConfig, batch: int, length: int, dtype=None, stacked: bool = False
) -> KVCache:
    """Zeroed KV cache for `length` slots: per layer, k and v of shape [B, K, S, E]; with
    `stacked`, one `LayerCache` of k and v [L, B, K, S, E] (the layer-scan decode path)."""
    shape = (batch, config.n_kv_heads, length, config.head_dim)
    dtype = dtype or config.compute_dtype
    if stacked:
        full = (config.n_layers, *shape)
        return LayerCache(jnp.zeros(full, dtype), jnp.zeros(full, dtype))
    return tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)
    )


def forward_cached(
    config: ModelConfig,
    params,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array,
    cache: KVCache,
    kv_mask_BS: jax.Array,
    cache_index: jax.Array,
    logits_index_B: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run T new tokens written at cache slots [cache_index, cache_index + T).

    `kv_mask_BS` marks which cache slots hold real tokens, the new ones included. Query at slot
    `cache_index + t` sees slots up to itself, so a prefill (T = prompt length) and a one-token
    decode step share this function. Logits are [B, T, V], or [B, 1, V] at token
    `logits_index_B` of each row when given (a prefill needs only the last prompt token's).
    `params` may have its layers split (`split_layers`), as the decode loop passes them.
    A stacked cache (`init_cache(stacked=True)`) runs the layers as a scan over the stacked
    weights instead (`_scanned_layers`).
    """
    return Decoder(config).apply(
        {"params": params},
        input_ids_BT,
        positions_BT,
        KeyMask(kv_mask_BS, cache_index),
        cache,
        cache_index,
        logits_index_B=logits_index_B,
    )


def _init_boxed(config: ModelConfig, rng: jax.Array):
    ids = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1), jnp.int32)
    return Decoder(config).init(rng, ids, positions_from_mask(mask), KeyMask(mask))["params"]


def init_params(config: ModelConfig, rng: jax.Array):
    """Random parameters (normal(initializer_range), zero biases, unit norm scales)."""
    return nn.unbox(_init_boxed(config, rng))


@functools.lru_cache(maxsize=64)
def param_logical_axes(config: ModelConfig):
    """Pytree (same structure as params) of PartitionSpecs of logical axis names."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct of the parameters, without allocating them."""
    return nn.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))
