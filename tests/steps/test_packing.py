"""Packed ranking batches (`data/pack.py`) against the padded ones they came from: the reward
model's and every DPO-family loss's value, gradient and metrics, alone and under gradient
accumulation, on the dense and the blocked attention paths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import registry
from rlhf_jax.data.pack import assign_rows, group_lengths, pack_rankings
from rlhf_jax.losses import get_loss, registered_losses
from rlhf_jax.models import attention, init_scalar_head
from rlhf_jax.models.heads import scalar_trunk
from rlhf_jax.steps import TrainState, make_preference_step, make_reward_step
from rlhf_jax.steps.packed import prompt_view
from rlhf_jax.steps.preference import completion_logps, make_logps_fn
from tests.tiny import tiny_model

N, K, PROMPT, COMPLETION = 6, 3, 4, 6
L = PROMPT + COMPLETION + 1
PAD = 1


def rankings(seed: int, eos: int) -> dict[str, np.ndarray]:
    """Ranking arrays as `encode_rankings` lays them out: random prompt and completion
    lengths, prompts with 2 or 3 real completions, ties, some completions cut (no EOS)."""
    rng = np.random.default_rng(seed)
    ids = np.full((N, K, L), PAD, np.int32)
    mask = np.zeros((N, K, L), np.float32)
    completion_mask = np.zeros((N, K), np.float32)
    rank = np.full((N, K), K, np.int32)
    start = np.zeros((N,), np.int32)
    for n in range(N):
        prompt = list(rng.integers(3, 60, rng.integers(1, PROMPT + 1)))
        real = int(rng.integers(2, K + 1))
        start[n] = len(prompt)
        for k in range(real):
            c = list(rng.integers(3, 60, rng.integers(1, COMPLETION + 1)))
            seq = prompt + c + ([eos] if rng.random() < 0.7 else [])
            ids[n, k, : len(seq)] = seq
            mask[n, k, : len(seq)] = 1
        completion_mask[n, :real] = 1
        rank[n, :real] = rng.integers(0, real, real)
        rank[n, 0] = 0 if rank[n, 1] else 1  # every prompt has a ranked pair
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": completion_mask,
        "rank": rank,
        "completion_start": start,
    }


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 8 on the blocked path, so packed rows (33 slots) span several."""
    blocked = functools.partial(attention.blocked_self_attention, block=8)
    monkeypatch.setattr(attention, "blocked_self_attention", blocked)


def run_step(step, params, batch):
    """One update with SGD at rate 1 (new params = params - gradient) and its metrics."""
    state = TrainState.create(params, optax.sgd(1.0))
    new, metrics = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    return new.params, {k: float(v) for k, v in metrics.items()}


def registered_fn(kind: str, name: str):
    return registry.lookup(kind, name)


def assert_same(padded, packed):
    (p_params, p_metrics), (q_params, q_metrics) = padded, packed
    assert p_metrics.keys() == q_metrics.keys()
    for key in p_metrics:
        np.testing.assert_allclose(
            q_metrics[key], p_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), p_params, q_params
    )


def test_pack_rankings_layout():
    """Every real token of every completion lands once, in its slot's segment, in order."""
    arrays = rankings(0, eos=2)
    packed = pack_rankings(arrays, prompts_per_row=2, multiple=2)
    r = packed["input_ids"].shape[0]
    assert (
        r % 2 == 0 and packed["input_ids"].shape[1] == K * L and packed["rank"].shape == (r, 2, K)
    )
    rows = assign_rows(group_lengths(arrays["attention_mask"]), K * L, 2)
    assert sorted(n for row in rows for n in row) == list(range(N))  # every prompt once
    seen = 0
    for row, prompts in enumerate(rows):
        for p, n in enumerate(prompts):
            np.testing.assert_array_equal(packed["rank"][row, p], arrays["rank"][n])
            for k in range(K):
                seq = packed["input_ids"][row][packed["segment_ids"][row] == p * K + k + 1]
                want = arrays["input_ids"][n, k][arrays["attention_mask"][n, k] > 0]
                np.testing.assert_array_equal(seq, want)
                seen += len(want)
        assert not packed["completion_mask"][row, len(prompts) :].any()  # the rest: empty slots
    assert seen == int(arrays["attention_mask"].sum())


# Each attention path once, with and without accumulation; pad == EOS reads the token before.
@pytest.mark.parametrize("kind, accum, eos", [("dense", 1, 2), ("blocked", 2, PAD)])
def test_reward_step_packed_equals_padded(kind, accum, eos):
    """The reward model's step: rewards read at each segment's own reward token, then the
    K-wise loss, its gradient and metrics as on the padded rows (counts of the whole batch
    under accumulation)."""
    config, trunk = tiny_model(n_layers=1, attention=kind, pad_token_id=PAD, eos_token_id=eos)
    params = {"trunk": scalar_trunk(trunk), "head": init_scalar_head(config, jax.random.key(1))}
    arrays = rankings(1, eos)
    step = make_reward_step(config, get_loss("reward", "default"), grad_accum=accum)
    padded = run_step(step, params, arrays)
    packed = run_step(step, params, pack_rankings(arrays, prompts_per_row=2, multiple=accum))
    assert_same(padded, packed)


@pytest.mark.parametrize("kind, accum", [("dense", 2), ("blocked", 1)])
def test_preference_step_packed_equals_padded(kind, accum):
    """DPO's step, with the reference's log-probs from the packed reference pass equal to the
    padded pass's (moved to their slots)."""
    config, params = tiny_model(n_layers=1, attention=kind, pad_token_id=PAD, eos_token_id=2)
    _, ref = tiny_model(seed=3, n_layers=1, attention=kind, pad_token_id=PAD, eos_token_id=2)
    arrays = rankings(2, eos=2)
    logps = jax.jit(make_logps_fn(config))
    arrays["ref_logps"] = np.asarray(logps(ref, arrays))
    packed = pack_rankings(arrays, prompts_per_row=2, multiple=accum)
    ref_packed = np.asarray(logps(ref, packed)).reshape(packed["ref_logps"].shape)
    np.testing.assert_allclose(ref_packed, packed["ref_logps"], rtol=1e-5, atol=1e-5)
    step = make_preference_step(config, get_loss("preference", "dpo", beta=0.5), accum)
    assert_same(run_step(step, params, arrays), run_step(step, params, packed))


def test_every_preference_loss_packed_equals_padded():
    """Each registered DPO-family loss (and the reward losses) on the packed prompt view:
    value, metrics and gradient with respect to the log-probs (rewards) as on the padded
    batch. With the model's outputs and their gradients equal (the step tests above), the
    whole gradient is then equal for every loss."""
    config, params = tiny_model(n_layers=1, pad_token_id=PAD, eos_token_id=2)
    arrays = rankings(4, eos=2)
    arrays["ref_logps"] = np.random.default_rng(0).normal(-20, 3, (N, K)).astype(np.float32)
    packed = pack_rankings(arrays, prompts_per_row=2)
    logps_of = jax.jit(functools.partial(completion_logps, config))
    logps_pad, tokens_pad = logps_of(params, arrays)
    logps_packed, tokens_packed = logps_of(params, packed)
    padded_view = {**arrays, "completion_tokens": tokens_pad}
    packed_view = {**prompt_view(packed), "completion_tokens": tokens_packed}
    rows = assign_rows(group_lengths(arrays["attention_mask"]), K * L, 2)
    slot = np.zeros(N, int)  # prompt n's place among the packed view's R * P prompts
    for r, prompts in enumerate(rows):
        for p, n in enumerate(prompts):
            slot[n] = 2 * r + p
    empty = np.ones(2 * len(rows), bool)
    empty[slot] = False
    np.testing.assert_allclose(np.asarray(logps_packed)[slot], logps_pad, rtol=1e-5)
    cases, seen = [], set()
    for kind, hparams, key in (("preference", {"beta": 0.5}, "logps"), ("reward", {}, "rewards")):
        for name in registered_losses()[kind]:
            loss = get_loss(kind, name, **hparams)
            if registered_fn(kind, name) not in seen:  # aliases ("default") once
                seen.add(registered_fn(kind, name))
                cases.append((name, loss, key))
    for name, loss, key in cases:

        def value(x, batch, loss=loss, key=key):
            out = loss({key: x}, batch)
            return out.loss, out.metrics

        (lp, mp), gp = jax.value_and_grad(value, has_aux=True)(logps_pad, padded_view)
        (lq, mq), gq = jax.value_and_grad(value, has_aux=True)(logps_packed, packed_view)
        np.testing.assert_allclose(lq, lp, rtol=1e-5, err_msg=name)
        for m in mp:
            np.testing.assert_allclose(mq[m], mp[m], rtol=1e-5, atol=1e-6, err_msg=f"{name} {m}")
        np.testing.assert_allclose(np.asarray(gq)[slot], gp, rtol=1e-5, atol=1e-7, err_msg=name)
        assert not np.asarray(gq)[empty].any(), name  # empty slots have no gradient
