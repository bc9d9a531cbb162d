"""`rlhf_jax.rollout.generate` against transformers' `generate` and against a full forward.

Greedy decoding is compared token for token with transformers on a ragged, left-padded batch.
That is only meaningful when the greedy choice is not decided by float rounding, so each
comparison first checks (on transformers' side) that the top-2 logit margin is comfortable at
every step; the tiny fixtures use a large init range to make it so.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import FAMILIES, VOCAB

from rlhf_jax.models import forward, load_hf
from rlhf_jax.rollout import generate


@pytest.fixture(autouse=True)
def _no_torch_grad():
    """PyTorch here is a reference only: no autograd, restored after each test (a module-level
    `torch.set_grad_enabled(False)` leaked into later tests in the same worker)."""
    with torch.no_grad():
        yield


N = 12  # max_new_tokens
P = 7  # padded prompt length
PROMPT_LENGTHS = (7, 4, 1)  # ragged, left-padded
PAD = 0
MIN_MARGIN = 1e-3  # smallest top-2 logit gap at which a greedy comparison is meaningful
TEMPERATURE = 0.7
jit_forward = jax.jit(forward, static_argnums=0)  # same function, compiled once per shape


def ragged_prompts(seed=0):
    rs = np.random.RandomState(seed)
    ids = np.full((len(PROMPT_LENGTHS), P), PAD, np.int32)
    mask = np.zeros((len(PROMPT_LENGTHS), P), np.int32)
    for r, n in enumerate(PROMPT_LENGTHS):
        ids[r, P - n :] = rs.randint(3, VOCAB, size=n)
        mask[r, P - n :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, eos_id=None, pad_id=PAD):
    """transformers' greedy continuation [B, N] (padded with pad_id after an early stop) and
    the per-step logits [B, steps, V]. eos_id=None: never stop early."""
    # Explicit keyword arguments: an `eos_token_id=None` inside a GenerationConfig object would
    # be filled in from the model's own generation_config (eos 2) and stop rows early.
    out = model.generate(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
        do_sample=False,
        max_new_tokens=N,
        min_new_tokens=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, ids.shape[1] :].numpy()
    if eos_id is None:
        assert new.shape[1] == N, "transformers stopped early although no EOS was set"
    tokens = np.full((ids.shape[0], N), pad_id, np.int64)
    tokens[:, : new.shape[1]] = new
    scores = torch.stack(out.scores, dim=1).float().numpy()
    return tokens, scores


def assert_greedy_well_posed(scores, tokens, alive):
    """Top-2 gap of the reference logits at every step a row is still generating."""
    top2 = np.sort(scores, axis=-1)[..., -2:]
    gaps = (top2[..., 1] - top2[..., 0])[alive[:, : scores.shape[1]]]
    assert gaps.min() > MIN_MARGIN, (
        f"fixture problem, not a library bug: near-tie in greedy decoding (gap {gaps.min()})"
    )
    np.testing.assert_array_equal(
        np.argmax(scores, -1)[alive[:, : scores.shape[1]]],
        tokens[:, : scores.shape[1]][alive[:, : scores.shape[1]]],
    )


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def mask_up_to_first(tokens, eos_id):
    """1 up to and including each row's first eos_id, 0 after."""
    is_eos = tokens == eos_id
    eos_before = np.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before this position
    return (eos_before == 0).astype(np.float32)


def check_output_types(out, batch):
    assert out.tokens.shape == (batch, N) and out.tokens.dtype == jnp.int32
    assert out.logprobs.shape == (batch, N) and out.logprobs.dtype == jnp.float32
    assert out.mask.shape == (batch, N) and out.mask.dtype == jnp.float32


@pytest.fixture(scope="module")
def loaded(hf_checkpoint, hf_torch_model):
    cache = {}

    def get(family):
        if family not in cache:
            path = hf_checkpoint(family)
            config, params = load_hf(path)
            cache[family] = (config, params, hf_torch_model(path))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers(family, loaded):
    config, params, model = loaded(family)
    ids, mask = ragged_prompts(0)
    ref_tokens, scores = hf_greedy(model, ids, mask)
    assert_greedy_well_posed(scores, ref_tokens, np.ones(ref_tokens.shape, bool))

    out = generate(
        config, params, ids, mask, jax.random.key(0), N, temperature=0.0, eos_id=None, pad_id=PAD
    )
    check_output_types(out, len(PROMPT_LENGTHS))
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_tokens, err_msg=family)
    np.testing.assert_array_equal(np.asarray(out.mask), np.ones((len(PROMPT_LENGTHS), N)))
    # Greedy log-probs are the plain log_softmax of the logits at each step.
    ref_logprobs = np.take_along_axis(log_softmax(scores), ref_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), ref_logprobs, atol=1e-4, err_msg=family)


def pick_mid_sequence_eos(tokens):
    """A token that some row emits first at a position in [1, N-2] (so the row stops mid-way),
    preferring tokens that other rows never emit (so they run to N) and positions near N/2
    (so several cached decode steps run before the stop)."""
    candidates = []
    for r in range(tokens.shape[0]):
        for j in range(1, N - 1):
            tok = int(tokens[r, j])
            if tok == PAD or tok in tokens[r, :j]:
                continue
            others_free = sum(tok not in tokens[o] for o in range(tokens.shape[0]) if o != r)
            candidates.append((-others_free, abs(j - N // 2), r, tok))
    assert candidates, f"fixture problem: no usable mid-sequence EOS candidate in {tokens}"
    return min(candidates)[3]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_eos_matches_transformers(family, loaded):
    config, params, model = loaded(family)
    ids, mask = ragged_prompts(0)
    free_run, _ = hf_greedy(model, ids, mask)
    eos = pick_mid_sequence_eos(free_run)
    ref_tokens, scores = hf_greedy(model, ids, mask, eos_id=eos, pad_id=PAD)
    expected_mask = mask_up_to_first(ref_tokens, eos)
    assert expected_mask.min() == 0, "fixture problem: the chosen EOS never stops a row"
    assert_greedy_well_posed(scores, ref_tokens, expected_mask > 0)
    # transformers pads finished rows with pad_token_id.
    assert np.all(ref_tokens[expected_mask == 0] == PAD)

    out = generate(
        config, params, ids, mask, jax.random.key(0), N, temperature=0.0, eos_id=eos, pad_id=PAD
    )
    check_output_types(out, len(PROMPT_LENGTHS))
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{family}, eos={eos}")
    np.testing.assert_array_equal(np.asarray(out.mask), expected_mask, err_msg=family)

    # Without a pad id, positions after EOS hold the EOS id itself.
    out_nopad = generate(
        config, params, ids, mask, jax.random.key(0), N, temperature=0.0, eos_id=eos, pad_id=None
    )
    np.testing.assert_array_equal(
        np.asarray(out_nopad.tokens), np.where(expected_mask > 0, ref_tokens, eos)
    )
    np.testing.assert_array_equal(np.asarray(out_nopad.mask), expected_mask)

    # A batch whose every row stops early (here: only the row that emits EOS), so decoding may
    # end before N steps: the remaining positions must still be padding with mask 0.
    r = int(np.argmin(expected_mask.sum(1)))
    ref_row, _ = hf_greedy(model, ids[r : r + 1], mask[r : r + 1], eos_id=eos, pad_id=PAD)
    out_row = generate(
        config,
        params,
        ids[r : r + 1],
        mask[r : r + 1],
        jax.random.key(0),
        N,
        temperature=0.0,
        eos_id=eos,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(out_row.tokens), ref_row)
    np.testing.assert_array_equal(np.asarray(out_row.mask), expected_mask[r : r + 1])


def teacher_forced_logprobs(config, params, ids, mask, out, temperature):
    """log_softmax(logits / temperature) of a full forward over prompt + generated tokens,
    gathered at the generated tokens: [B, N]."""
    tokens = np.asarray(out.tokens)
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.asarray(out.mask, np.int32)], axis=1)
    logits = np.asarray(jit_forward(config, params, full_ids, full_mask), np.float64)
    p = ids.shape[1]
    next_logits = logits[:, p - 1 : p - 1 + N]  # logits that chose generated token t
    logp = log_softmax(next_logits / temperature)
    return np.take_along_axis(logp, tokens[..., None].astype(np.int64), -1)[..., 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_equal_teacher_forced_forward(family, loaded):
    """Pins the KV-cache decode path to the full forward: the log-probs the rollout returns
    for the tokens it sampled equal those of one forward pass over prompt + sample."""
    config, params, _ = loaded(family)
    ids, mask = ragged_prompts(1)
    out = generate(
        config, params, ids, mask, jax.random.key(1234), N, temperature=TEMPERATURE, eos_id=None
    )
    check_output_types(out, len(PROMPT_LENGTHS))
    tokens = np.asarray(out.tokens)
    assert tokens.min() >= 0 and tokens.max() < config.vocab_size
    np.testing.assert_array_equal(np.asarray(out.mask), np.ones_like(tokens))
    ref = teacher_forced_logprobs(config, params, ids, mask, out, TEMPERATURE)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-5, rtol=0, err_msg=family)
    assert np.all(np.asarray(out.logprobs) <= 0)

    # Same with an EOS that stops some rows early: compare on masked positions only.
    eos = pick_mid_sequence_eos(tokens)
    out_eos = generate(
        config,
        params,
        ids,
        mask,
        jax.random.key(1234),
        N,
        temperature=TEMPERATURE,
        eos_id=eos,
        pad_id=PAD,
    )
    tokens_eos = np.asarray(out_eos.tokens)
    m = np.asarray(out_eos.mask)
    np.testing.assert_array_equal(m, mask_up_to_first(tokens_eos, eos))
    assert np.all(tokens_eos[m == 0] == PAD)
    ref_eos = teacher_forced_logprobs(config, params, ids, mask, out_eos, TEMPERATURE)
    live = m > 0
    np.testing.assert_allclose(
        np.asarray(out_eos.logprobs)[live], ref_eos[live], atol=1e-5, rtol=0, err_msg=family
    )


def test_sampling_is_seeded(loaded):
    """Same key, same sample; a different key gives a different sample (tiny vocab, N=12)."""
    config, params, _ = loaded("llama")
    ids, mask = ragged_prompts(2)
    a = generate(config, params, ids, mask, jax.random.key(7), N, temperature=TEMPERATURE)
    b = generate(config, params, ids, mask, jax.random.key(7), N, temperature=TEMPERATURE)
    c = generate(config, params, ids, mask, jax.random.key(8), N, temperature=TEMPERATURE)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
