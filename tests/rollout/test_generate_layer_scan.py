"""The layer-scan decode path (`generate(layer_scan=True)`, `ppo.decode_layer_scan`): the
same tokens and log-probs as the unrolled path, and no per-layer copy of the weights."""

import jax
import jax.numpy as jnp
import numpy as np
from tiny import tiny_model

from rlhf_jax.models import forward
from rlhf_jax.rollout import SamplingSpec, continue_generate, generate
from rlhf_jax.rollout.generate import _generate

EOS = (3, 4, 5, 6, 7, 8, 9)


def _prompts(rows: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 61, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row
    return ids * mask, mask


def _numpy_logprobs(config, params, ids, mask, out):
    """log softmax (float64, NumPy) of a plain forward over prompt + response, at each
    generated token: a reference that shares no code with either decode path."""
    p = ids.shape[1]
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([mask, np.asarray(out.mask, np.int32)], axis=1)
    logits = np.asarray(forward(config, params, seq, seq_mask), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, p - 1 : -1], seq[:, p:, None], axis=-1)[..., 0]
    return picked * np.asarray(out.mask)


def _both(config, params, ids, mask, n, **kw):
    key = jax.random.key(7)
    unrolled = generate(config, params, ids, mask, key, n, **kw)
    scanned = generate(config, params, ids, mask, key, n, layer_scan=True, **kw)
    return unrolled, scanned


def _assert_same(a, b):
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.mask, a.mask)
    np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=1e-5, atol=1e-6)


def test_greedy_over_cache_buckets_equals_the_unrolled_path_and_a_numpy_reference():
    # 250 prompt slots + 12 new tokens: the decode crosses from the 256-slot bucket to all.
    config, params = tiny_model(n_layers=3, max_position_embeddings=300)
    ids, mask = _prompts(3, 250)
    unrolled, scanned = _both(config, params, ids, mask, 12, temperature=0.0, eos_id=EOS)
    _assert_same(unrolled, scanned)
    want = _numpy_logprobs(config, params, ids, mask, scanned)
    np.testing.assert_allclose(scanned.logprobs, want, rtol=1e-5, atol=1e-5)


def test_sampled_groups_compacted_with_support_equal_the_unrolled_path():
    config, params = tiny_model(n_layers=3)
    ids, mask = _prompts(4, 5, seed=1)
    kw = dict(temperature=1.0, top_k=40, eos_id=EOS, pad_id=0, record_support=True)
    unrolled, scanned = _both(
        config, params, ids, mask, 12, samples_per_prompt=2, compact=True, **kw
    )
    lengths = np.asarray(unrolled.mask).sum(1)
    assert (lengths < 12).any() and (lengths == 12).any(), lengths  # compaction ran
    _assert_same(unrolled, scanned)
    np.testing.assert_array_equal(scanned.support, unrolled.support)


def test_a_layer_scan_state_continues_like_the_unrolled_one():
    config, params = tiny_model()
    ids, mask = _prompts(4, 5, seed=2)
    kw = dict(temperature=0.0, eos_id=EOS, pad_id=0, return_state=True)
    unrolled, scanned = _both(config, params, ids, mask, 6, **kw)
    assert scanned.state.cache.k.shape[0] == config.n_layers  # one stacked cache
    appended = np.random.default_rng(3).integers(10, 61, (4, 3)).astype(np.int32)
    spec = SamplingSpec.of(5, temperature=0.0, eos_id=EOS, pad_id=0)
    ones = np.ones_like(appended)
    key = jax.random.key(0)
    a = continue_generate(config, params, unrolled.state, appended, ones, key, spec)
    b = continue_generate(config, params, scanned.state, appended, ones, key, spec)
    _assert_same(a, b)


def _temporaries(config, params, ids, mask, layer_scan: bool) -> int:
    spec = SamplingSpec.of(4, temperature=1.0)
    compiled = _generate.lower(
        config,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jax.random.key(0),
        spec=spec,
        activations=None,
        layer_scan=layer_scan,
    ).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_layer_scan_holds_no_copy_of_the_layers_weights():
    # Wide layers, one short row: the weights dominate the temporaries of the unrolled path.
    config, params = tiny_model(n_layers=4, d_model=128, n_heads=4, head_dim=32, mlp_dim=512)
    ids, mask = _prompts(2, 4)
    layers = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"]))
    unrolled = _temporaries(config, params, ids, mask, False)
    scanned = _temporaries(config, params, ids, mask, True)
    # The unrolled path copies every layer (`split_layers`); the scan at most ~one at a time.
    assert unrolled - scanned > 0.7 * layers, (unrolled, scanned, layers)
