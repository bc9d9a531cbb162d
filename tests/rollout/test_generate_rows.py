"""Generation that pays only for live rows and unique prompts: compaction of finished rows,
one prefill per prompt for its G samples, and continuing a returned decode state."""

import jax
import jax.numpy as jnp
import numpy as np
from tiny import tiny_model

from rlhf_jax.models import forward
from rlhf_jax.rollout import SamplingSpec, continue_generate, generate
from rlhf_jax.rollout.generate import _generate

EOS = (3, 4, 5, 6, 7, 8, 9)  # many EOS ids: rows of the tiny model end at varied lengths


def _prompts(rows: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 61, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row
    return ids * mask, mask


def _teacher_forced_logprobs(config, params, ids, mask, out):
    """log softmax of a plain forward over prompt + response, at each generated token."""
    p = ids.shape[1]
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    seq_mask = np.concatenate([mask, np.asarray(out.mask, np.int32)], axis=1)
    logits = np.asarray(forward(config, params, seq, seq_mask), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, p - 1 : -1], seq[:, p:, None], axis=-1)[..., 0]
    return picked * np.asarray(out.mask)


def test_compacted_rows_and_one_prefill_per_prompt_give_the_full_batch_tokens():
    config, params = tiny_model()
    ids, mask = _prompts(4, 5)
    g, n = 2, 12
    kw = dict(temperature=1.0, top_k=40, eos_id=EOS, pad_id=0, record_support=True)
    full = generate(
        config, params, np.repeat(ids, g, 0), np.repeat(mask, g, 0), jax.random.key(1), n, **kw
    )
    lean = generate(
        config, params, ids, mask, jax.random.key(1), n, samples_per_prompt=g, compact=True, **kw
    )
    lengths = np.asarray(full.mask).sum(1)
    # The case compaction is for: most rows end early, some run to the end.
    assert (lengths < n).sum() > lengths.size // 2 and (lengths == n).any(), lengths
    np.testing.assert_array_equal(lean.tokens, full.tokens)
    np.testing.assert_array_equal(lean.mask, full.mask)
    np.testing.assert_array_equal(lean.support, full.support)
    # A smaller batch's matmuls may round differently in the last bits.
    np.testing.assert_allclose(lean.logprobs, full.logprobs, rtol=1e-5, atol=1e-6)


def test_compacted_logprobs_equal_a_teacher_forced_forward():
    config, params = tiny_model()
    ids, mask = _prompts(8, 4, seed=1)
    out = generate(
        config, params, ids, mask, jax.random.key(5), 10, eos_id=EOS, pad_id=0, compact=True
    )
    assert np.asarray(out.mask).sum(1).min() < 5  # rows did end early
    want = _teacher_forced_logprobs(config, params, ids, mask, out)
    np.testing.assert_allclose(out.logprobs, want, rtol=1e-5, atol=1e-5)


def test_one_prefill_per_prompt_costs_a_gth_of_the_repeated_prefill():
    config, params = tiny_model()
    g, p = 8, 48
    ids, mask = _prompts(2, p)
    spec = SamplingSpec.of(1, temperature=1.0)  # one token: prefill and one choice, no loop

    def flops(prompt_ids, prompt_mask, fan_out):
        compiled = _generate.lower(
            config,
            params,
            jnp.asarray(prompt_ids),
            jnp.asarray(prompt_mask),
            jax.random.key(0),
            spec=spec,
            activations=None,
            fan_out=fan_out,
        ).compile()
        return compiled.cost_analysis()["flops"]

    repeated = flops(np.repeat(ids, g, 0), np.repeat(mask, g, 0), 1)
    once = flops(ids, mask, g)
    assert once / repeated < 1.5 / g, (once, repeated)


def test_continuing_after_appended_tokens_equals_generating_over_the_whole_context():
    config, params = tiny_model()
    ids, mask = _prompts(4, 5, seed=2)
    first = generate(
        config,
        params,
        ids,
        mask,
        jax.random.key(0),
        6,
        temperature=0.0,
        eos_id=EOS,
        pad_id=0,
        return_state=True,
    )
    lengths = np.asarray(first.mask).sum(1)
    assert lengths.min() < 6 and lengths.max() == 6  # rows that ended and rows that did not
    rng = np.random.default_rng(3)
    appended = rng.integers(10, 61, (4, 3)).astype(np.int32)
    appended_mask = np.ones_like(appended)
    appended_mask[2, 0] = 0  # padding inside the appended tokens too
    spec = SamplingSpec.of(5, temperature=0.0, eos_id=EOS, pad_id=0)
    went_on = continue_generate(
        config,
        params,
        first.state,
        appended,
        appended_mask,
        jax.random.key(0),
        spec,
        return_state=True,
    )
    context = np.concatenate([ids, np.asarray(first.tokens), appended], axis=1)
    context_mask = np.concatenate([mask, np.asarray(first.mask, np.int32), appended_mask], axis=1)
    whole = generate(config, params, context, context_mask, jax.random.key(0), spec=spec)
    np.testing.assert_array_equal(went_on.tokens, whole.tokens)
    np.testing.assert_array_equal(went_on.mask, whole.mask)
    np.testing.assert_allclose(went_on.logprobs, whole.logprobs, rtol=1e-5, atol=1e-5)
    # and again, from the continuation's own state
    again = continue_generate(
        config,
        params,
        went_on.state,
        appended[:, :1],
        appended_mask[:, :1],
        jax.random.key(0),
        spec,
    )
    context = np.concatenate([context, np.asarray(went_on.tokens), appended[:, :1]], axis=1)
    context_mask = np.concatenate(
        [context_mask, np.asarray(went_on.mask, np.int32), appended_mask[:, :1]], axis=1
    )
    whole = generate(config, params, context, context_mask, jax.random.key(0), spec=spec)
    np.testing.assert_array_equal(again.tokens, whole.tokens)
