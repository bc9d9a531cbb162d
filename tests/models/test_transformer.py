"""Model properties that hold for every family: logical axes, remat, dtypes, the scalar head."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config, tiny_model

import rlhf_jax
from rlhf_jax.models import (
    forward,
    hidden_states,
    init_scalar_head,
    lm_logits,
    param_logical_axes,
    scalar_forward,
    value_at_last_token,
)
from rlhf_jax.models.config import FAMILY_SWITCHES as LIBRARY_FAMILIES
from rlhf_jax.models.transformer import forward_cached, init_cache, positions_from_mask

# Tiny models are Llama-shaped; these switches turn them into each family.
FAMILY_SWITCHES = {
    family: dict(LIBRARY_FAMILIES[family], model_type=family)
    | ({"n_kv_heads": 4} if family == "gpt2" else {})
    | ({"head_dim": 16} if family == "qwen3" else {})
    for family in LIBRARY_FAMILIES
}
KNOWN_AXES = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "position"}


@pytest.mark.parametrize("family", FAMILY_SWITCHES)
def test_every_weight_has_logical_axes(family):
    config, params = tiny_model(**FAMILY_SWITCHES[family])
    axes = param_logical_axes(config)
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    flat_axes = dict(
        jax.tree_util.tree_leaves_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    )
    assert len(flat_axes) == len(flat_params)
    for path, leaf in flat_params:
        spec = flat_axes[path]
        assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
        assert set(spec) <= KNOWN_AXES, (path, spec)
        if jax.tree_util.keystr(path).startswith("['layers']"):
            assert spec[0] == "layers" and leaf.shape[0] == config.n_layers


def test_models_never_name_mesh_axes():
    """Sharding is by logical names only: mesh axes belong to the sharding module and config."""
    models_dir = Path(rlhf_jax.__file__).parent / "models"
    pattern = re.compile(r"""["'](data|fsdp|tensor)["']""")
    for file in models_dir.rglob("*.py"):
        assert not pattern.search(file.read_text()), file


def test_remat_changes_nothing_numerically():
    config, params = tiny_model()
    remat_config = config.replace(remat=True)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % config.vocab_size
    mask = jnp.ones((2, 6))

    def loss(p, cfg):
        return jnp.mean(forward(cfg, p, ids, mask) ** 2)

    g1 = jax.grad(loss)(params, config)
    g2 = jax.grad(loss)(params, remat_config)
    np.testing.assert_allclose(loss(params, config), loss(params, remat_config), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_logits_of_hidden_states_are_the_forward_logits(tie):
    """PPO slices hidden states to the response and applies the head itself."""
    config, params = tiny_model(tie_embeddings=tie)
    ids = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) % config.vocab_size
    mask = jnp.ones((2, 7)).at[0, :2].set(0)
    h = hidden_states(config, params, ids, mask)
    np.testing.assert_array_equal(
        lm_logits(config, params, h[:, 3:]), forward(config, params, ids, mask)[:, 3:]
    )


def test_bfloat16_compute_and_params_stay_close_to_float32():
    config, params = tiny_model()
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % config.vocab_size
    mask = jnp.ones((2, 8))
    ref = forward(config, params, ids, mask)
    bf_cfg = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(bf_cfg, bf_params, ids, mask)
    assert out.dtype == jnp.float32  # logits always float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_prefill_then_decode_equals_full_forward():
    config, params = tiny_model(**FAMILY_SWITCHES["gpt2"])
    ids = np.array([[0, 0, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], np.int32)
    mask = (np.arange(7)[None] >= np.array([[2], [0]])).astype(np.int32)
    full = forward(config, params, ids, mask)
    cache = init_cache(config, 2, 7)
    kv_mask = jnp.zeros((2, 7), jnp.int32).at[:, :4].set(mask[:, :4])
    pos = positions_from_mask(jnp.asarray(mask))
    logits, cache = forward_cached(
        config, params, ids[:, :4], pos[:, :4], cache, kv_mask, jnp.int32(0)
    )
    steps = [logits]
    for t in range(4, 7):
        kv_mask = kv_mask.at[:, t].set(1)
        logits, cache = forward_cached(
            config, params, ids[:, t : t + 1], pos[:, t : t + 1], cache, kv_mask, jnp.int32(t)
        )
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(cached * mask[..., None], full * mask[..., None], atol=1e-5)


def test_scalar_head_init_and_last_token():
    config, trunk = tiny_model()
    head = init_scalar_head(config, jax.random.key(1))
    assert head["kernel"].shape == (config.d_model,) and float(head["bias"]) == 0.0
    std = float(jnp.std(init_scalar_head(tiny_config(d_model=4096), jax.random.key(2))["kernel"]))
    assert abs(std - 1 / np.sqrt(4097)) < 0.05 / np.sqrt(4097) * 10
    params = {"trunk": trunk, "head": head}
    ids = np.array([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]], np.int32)
    left = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    v_left = scalar_forward(config, params, ids[:1], left[:1])
    v_right = scalar_forward(config, params, ids[1:], right[1:])
    assert v_left.shape == (1, 5)
    np.testing.assert_allclose(
        value_at_last_token(v_left, left[:1]), value_at_last_token(v_right, right[1:]), atol=1e-5
    )
    np.testing.assert_allclose(value_at_last_token(v_left, left[:1]), v_left[:, 4])
    np.testing.assert_allclose(value_at_last_token(v_right, right[1:]), v_right[:, 2])
