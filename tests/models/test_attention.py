"""Every attention path equals the dense reference: `jax.nn.dot_product_attention` (XLA) over a
mask built here by plain NumPy loops, forward and gradients, with left padding, packed
segments, grouped-query heads and lengths that are not a multiple of the block."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_model

from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import attention
from rlhf_jax.models.attention import KeyMask, blocked_self_attention, cached_attention, resolve
from rlhf_jax.models.attention_cudnn import ALIGN, contiguous_rows, rotated_attention
from rlhf_jax.models.attention_splash import splash_attention
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import forward, forward_cached, init_cache, positions_from_mask

B, H, KV, E = 2, 4, 2, 8  # GQA: two query heads per kv head


def reference_mask(valid_BS, q_start, t, segments_BT=None) -> np.ndarray:
    """[B, 1, T, S] by the definition: key s visible to query t when s <= q_start + t, s is
    real, and (packed) both carry the same segment id."""
    b, s = valid_BS.shape
    mask = np.zeros((b, 1, t, s), bool)
    for i in range(b):
        for qi in range(t):
            for kj in range(s):
                same = segments_BT is None or segments_BT[i, qi] == segments_BT[i, kj]
                mask[i, 0, qi, kj] = kj <= q_start + qi and valid_BS[i, kj] > 0 and same
    return mask


def qkv(t, s=None, seed=0):
    r = np.random.default_rng(seed)
    s = s or t
    q = jnp.asarray(r.normal(size=(B, t, H, E)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, s, KV, E)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, s, KV, E)), jnp.float32)
    w = jnp.asarray(r.normal(size=(B, t, H, E)), jnp.float32)
    return q, k, v, w


T = 13  # not a multiple of the blocks below
LEFT_PADDED = np.ones((B, T), np.int32)
LEFT_PADDED[0, :4] = 0
PACKED = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 0], [1] * 9 + [2] * 4])


def cases():
    both_ends = np.ones((B, T), np.int32)
    both_ends[1, :3] = 0
    both_ends[1, -2:] = 0
    return {
        "left_padding": KeyMask(jnp.asarray(LEFT_PADDED)),
        "both_ends": KeyMask(jnp.asarray(both_ends)),
        "packed": KeyMask(jnp.asarray((PACKED > 0).astype(np.int32)), 0, jnp.asarray(PACKED)),
    }


def check_against_dense(fn, mask: KeyMask, atol=2e-5):
    """fn(q, k, v) equals the dense reference at real queries, and so do d(loss)/d(q, k, v)
    for a loss that reads real queries only (padding queries' outputs are unspecified)."""
    q, k, v, w = qkv(T)
    seg = None if mask.segment_ids_BT is None else np.asarray(mask.segment_ids_BT)
    dense = jnp.asarray(reference_mask(np.asarray(mask.kv_valid_BS), 0, T, seg))
    real = mask.kv_valid_BS[:, :, None, None].astype(jnp.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w * real)

    ref_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense)  # noqa: E731
    np.testing.assert_allclose(fn(q, k, v) * real, ref_fn(q, k, v) * real, atol=atol)
    got = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=atol)


@pytest.mark.parametrize("case", ["left_padding", "both_ends", "packed"])
@pytest.mark.parametrize("block", [4, 16])
def test_blocked_equals_dense(case, block):
    mask = cases()[case]
    check_against_dense(
        jax.jit(lambda q, k, v: blocked_self_attention(q, k, v, mask, block=block)), mask
    )


@pytest.mark.parametrize("case", ["left_padding", "both_ends"])
def test_cudnn_rotation_equals_dense(case):
    """The rotation that lets cuDNN's lengths express left padding, checked through the same
    call with XLA's implementation (cuDNN itself needs a GPU)."""
    mask = cases()[case]
    start, length, one_span = contiguous_rows(mask.kv_valid_BS)
    assert bool(one_span)
    check_against_dense(
        jax.jit(lambda q, k, v: rotated_attention(q, k, v, start, length, None)), mask
    )


def test_cudnn_rows_reach_cudnn_at_an_aligned_length(monkeypatch):
    """jax's cuDNN wrapper refuses an odd length under differentiation (an H200 run failed
    at 1,025 tokens): the rotated rows are padded at their end to a multiple of ALIGN, and
    the result is still the dense one (T = 13 here; the equality test above)."""
    seen = []
    xla = jax.nn.dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return xla(q, k, v, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    mask = cases()["both_ends"]
    start, length, _ = contiguous_rows(mask.kv_valid_BS)
    q, k, v, w = qkv(T)
    out = jax.grad(lambda q: jnp.sum(rotated_attention(q, k, v, start, length, None) * w))(q)
    assert out.shape == q.shape
    lengths = [n for shape in seen for n in shape]
    assert lengths and all(n % 2 == 0 and n % ALIGN == 0 and n >= T for n in lengths), seen


def test_a_row_with_a_hole_is_not_one_span():
    valid = np.ones((B, T), np.int32)
    valid[1, 5] = 0
    assert not bool(contiguous_rows(jnp.asarray(valid))[2])
    assert bool(contiguous_rows(jnp.zeros((B, T), jnp.int32))[2])  # empty rows are harmless


@pytest.mark.parametrize("case", ["left_padding", "packed"])
def test_splash_in_interpret_mode_equals_dense(case):
    mask = cases()[case]
    check_against_dense(lambda q, k, v: splash_attention(q, k, v, mask, interpret=True), mask)


@pytest.mark.parametrize("kind", ["dense", "blocked"])
def test_cached_attention_reads_only_a_bucket_and_equals_all_slots(monkeypatch, kind):
    """Buckets of 4, 8, 16, 19 slots over a 19-slot cache: a decode step and a 3-token chunk
    at slots in different buckets give what attention over every slot gives."""
    monkeypatch.setattr(attention, "MIN_BUCKET", 4)
    monkeypatch.setattr(attention, "BLOCK", 4)
    s = 19
    assert attention.buckets(s) == (4, 8, 16, 19)
    valid = np.ones((B, s), np.int32)
    valid[0, :2] = 0
    for t, starts in ((1, (0, 3, 7, 12, 18)), (3, (0, 6, 16))):
        q, k, v, _ = qkv(t, s, seed=t)
        k_BKSE, v_BKSE = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        fn = jax.jit(
            lambda q, k, v, q0: cached_attention(q, k, v, KeyMask(jnp.asarray(valid), q0), kind)
        )
        for q0 in starts:
            dense = reference_mask(valid, q0, t)
            want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(dense))
            got = fn(q, k_BKSE, v_BKSE, jnp.int32(q0))
            sees = dense.any(-1)[:, 0, :, None, None]  # a query seeing no key is padding
            np.testing.assert_allclose(
                got * sees, want * sees, atol=2e-5, err_msg=f"t={t} q_start={q0}"
            )


def test_auto_keeps_dense_below_the_threshold_and_blocks_above_on_cpu():
    short, long = attention.DENSE_BELOW - 1, attention.DENSE_BELOW
    assert resolve("auto", jnp.float32, 64, short, False) == "dense"
    assert resolve("auto", jnp.bfloat16, 64, long, False) == "blocked"  # on CPU
    assert resolve("blocked", jnp.float32, 64, short, False) == "blocked"


def test_unknown_attention_kind_is_refused_naming_the_field():
    with pytest.raises(RlhfJaxError, match="'attention': 'flash'"):
        ModelConfig(
            model_type="llama", vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
            head_dim=4, mlp_dim=8, max_position_embeddings=8, attention="flash",
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["blocked", "splash"])
def test_model_logits_equal_dense_at_real_tokens(monkeypatch, kind):
    """The whole decoder (layer scan, RoPE, GQA) through each path, left-padded and packed."""
    from rlhf_jax.models import attention_splash

    monkeypatch.setattr(attention, "BLOCK", 4)
    if kind == "splash":  # the kernel on CPU: Pallas' interpreter
        real_splash = attention_splash.splash_attention
        monkeypatch.setattr(
            attention_splash, "splash_attention",
            lambda *a: real_splash(*a, interpret=True),
        )  # fmt: skip
    config, params = tiny_model()
    ids = jnp.asarray(np.arange(B * T).reshape(B, T) % config.vocab_size, jnp.int32)
    for valid, seg in ((LEFT_PADDED, None), ((PACKED > 0).astype(np.int32), PACKED)):
        want = forward(config.replace(attention="dense"), params, ids, valid, seg)
        got = forward(config.replace(attention=kind), params, ids, valid, seg)
        real = valid[:, :, None]
        np.testing.assert_allclose(got * real, want * real, atol=2e-5)


def test_decode_over_buckets_equals_the_full_forward(monkeypatch):
    """Prefill with the blocked path, then decode steps whose buckets grow with the cache."""
    monkeypatch.setattr(attention, "MIN_BUCKET", 4)
    monkeypatch.setattr(attention, "BLOCK", 4)
    config, params = tiny_model(attention="blocked")
    ids = jnp.asarray(np.arange(B * T).reshape(B, T) % config.vocab_size, jnp.int32)
    mask = jnp.asarray(LEFT_PADDED)
    full = forward(config.replace(attention="dense"), params, ids, mask)
    p = 6
    cache = init_cache(config, B, T)
    kv_mask = jnp.zeros((B, T), jnp.int32).at[:, :p].set(mask[:, :p])
    pos = positions_from_mask(mask)
    step = jax.jit(functools.partial(forward_cached, config))
    logits, cache = step(params, ids[:, :p], pos[:, :p], cache, kv_mask, jnp.int32(0))
    outs = [logits]
    for t in range(p, T):
        kv_mask = kv_mask.at[:, t].set(1)
        logits, cache = step(
            params, ids[:, t : t + 1], pos[:, t : t + 1], cache, kv_mask, jnp.int32(t)
        )
        outs.append(logits)
    real = mask[:, :, None]
    np.testing.assert_allclose(jnp.concatenate(outs, 1) * real, full * real, atol=2e-5)
