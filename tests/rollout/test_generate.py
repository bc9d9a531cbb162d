"""Generation semantics that do not need a reference implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_model

from rlhf_jax.models import forward
from rlhf_jax.rollout import generate
from rlhf_jax.rollout.generate import _generate


def prompts(left: bool):
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0], [11, 0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    if left:  # move the padding to the left
        ids = np.stack([np.roll(r, (m == 0).sum()) for r, m in zip(ids, mask)])
        mask = (ids > 0).astype(np.int32)
    return ids, mask


def test_left_and_right_padding_give_the_same_continuation():
    config, params = tiny_model()
    outs = []
    for left in (True, False):
        ids, mask = prompts(left)
        outs.append(generate(config, params, ids, mask, jax.random.key(0), 6, temperature=0.0))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)


def test_eos_stops_the_row_and_pads_after():
    config, params = tiny_model()
    ids, mask = prompts(True)
    free = generate(config, params, ids, mask, jax.random.key(0), 8, temperature=0.0)
    eos = int(free.tokens[0, 2])  # a token row 0 emits at step 2
    out = generate(
        config, params, ids, mask, jax.random.key(0), 8, temperature=0.0, eos_id=eos, pad_id=0
    )
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(3):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == eos)
        stop = hits[0] + 1 if hits.size else 8
        assert m[row, :stop].all() and not m[row, stop:].any()
        np.testing.assert_array_equal(tokens[row, :stop], np.asarray(free.tokens[row, :stop]))
        assert (tokens[row, stop:] == 0).all()
        assert (np.asarray(out.logprobs)[row, stop:] == 0).all()


def test_several_eos_ids_and_early_exit_when_all_rows_stop():
    config, params = tiny_model()
    ids, mask = prompts(True)
    free = generate(config, params, ids, mask, jax.random.key(0), 5, temperature=0.0)
    first = tuple(int(t) for t in np.asarray(free.tokens[:, 0]))
    out = generate(
        config, params, ids, mask, jax.random.key(0), 5, temperature=0.0, eos_id=first, pad_id=0
    )
    assert np.asarray(out.mask)[:, 0].all() and not np.asarray(out.mask)[:, 1:].any()


def test_sampled_logprobs_equal_teacher_forced_forward():
    config, params = tiny_model()
    ids, mask = prompts(True)
    t = 0.8
    out = generate(config, params, ids, mask, jax.random.key(3), 7, temperature=t)
    full = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.asarray(out.mask)], axis=1)
    logits = forward(config, params, full, full_mask)[:, ids.shape[1] - 1 : -1] / t
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp) * np.asarray(out.mask), out.logprobs, atol=1e-5)


def test_keys_control_sampling():
    config, params = tiny_model()
    ids, mask = prompts(True)
    a = generate(config, params, ids, mask, jax.random.key(1), 10)
    b = generate(config, params, ids, mask, jax.random.key(1), 10)
    c = generate(config, params, ids, mask, jax.random.key(2), 10)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_compiles_once_per_shape():
    config, params = tiny_model(seed=7)
    ids, mask = prompts(True)
    generate(config, params, ids, mask, jax.random.key(0), 4, temperature=0.5)
    before = _generate._cache_size()
    for seed in range(3):  # new data and keys, same shapes and settings
        generate(config, params, ids + seed, mask, jax.random.key(seed), 4, temperature=0.5)
    assert _generate._cache_size() == before


@pytest.mark.parametrize(
    "kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=1.5)]
)
def test_bad_arguments_are_refused(kwargs):
    config, params = tiny_model()
    ids, mask = prompts(True)
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError):
        generate(config, params, ids, mask, jax.random.key(0), **args)


def test_recorded_support_is_the_kept_set_each_token_was_drawn_from():
    """`record_support`: the same draw, plus each step's kept set (top-3 of the decode logits,
    which a teacher-forced forward reproduces), holding the token; zero after EOS; None when
    nothing is truncated or the caller does not ask."""
    config, params = tiny_model()
    ids, mask = prompts(True)
    kw = dict(temperature=0.9, top_k=3, eos_id=(3, 4, 5, 6, 7, 8), pad_id=0)
    plain = generate(config, params, ids, mask, jax.random.key(2), 6, **kw)
    out = generate(config, params, ids, mask, jax.random.key(2), 6, record_support=True, **kw)
    assert plain.support is None
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_array_equal(out.logprobs, plain.logprobs)
    v = config.vocab_size
    as_bytes = np.ascontiguousarray(np.asarray(out.support, "<u4")).view(np.uint8)
    support = np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :v].astype(bool)
    real = np.asarray(out.mask) > 0
    assert not real.all() and not support[~real].any()
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([mask, real.astype(np.int32)], axis=1)
    logits = np.asarray(forward(config, params, seq, seq_mask))[:, ids.shape[1] - 1 : -1]
    tokens = np.asarray(out.tokens)
    for b, t in zip(*np.nonzero(real)):
        top3 = set(np.argsort(-logits[b, t])[:3].tolist())
        assert set(np.flatnonzero(support[b, t]).tolist()) == top3
        assert tokens[b, t] in top3
    untruncated = generate(
        config, params, ids, mask, jax.random.key(2), 6, record_support=True, temperature=0.9
    )
    assert untruncated.support is None


def test_a_sampling_spec_is_the_same_call_as_its_keywords():
    """`SamplingSpec.of` takes `generate`'s keywords; `generate(spec=...)` samples exactly
    what the keywords do, and giving both max_new_tokens and a spec is refused."""
    from rlhf_jax.rollout import SamplingSpec

    config, params = tiny_model()
    ids, mask = prompts(True)
    kw = dict(temperature=0.8, top_p=0.9, eos_id=3, record_support=True)
    by_keywords = generate(config, params, ids, mask, jax.random.key(4), 5, **kw)
    spec = SamplingSpec.of(5, **kw)
    assert spec.eos_ids == (3,) and spec.pad_id == 3  # the pad id defaults to the first EOS
    by_spec = generate(config, params, ids, mask, jax.random.key(4), spec=spec)
    for a, b in zip(by_keywords, by_spec):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        generate(config, params, ids, mask, jax.random.key(4), 5, spec=spec)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec.of(5, top_p=0.0)
