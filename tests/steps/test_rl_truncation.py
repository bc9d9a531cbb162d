"""The RL update under top-k / top-p sampling (issue 20): every log-prob of a rollout (the
sampler's, the reference's, the trainer's) is over the support the sampler recorded, so the
loss and its gradient stay finite for every KL placement and estimator, also when a sampled
token has left the updated policy's own top-k / top-p, and the values are the documented
convention (docs/algorithms.md) as computed here in NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_model

from rlhf_jax.config import OptimConfig, PPOConfig
from rlhf_jax.models import init_scalar_head
from rlhf_jax.steps import (
    Frozen,
    RLAlgorithm,
    init_rl_state,
    make_experience_fn,
    make_optimizer,
    make_update_fn,
    response_logits,
)

EOS = tuple(range(3, 13))  # many EOS ids: rows end early, so padded positions exist
TEMPERATURE = 0.8
BETA = 0.5


def make_ppo(**changes) -> PPOConfig:
    optim = OptimConfig(lr=1e-2, grad_clip=0.0, eps=1e-4)
    settings = dict(
        rollout_batch=4,
        samples_per_prompt=2,
        advantage="grpo",
        minibatch_size=8,
        epochs=1,
        max_new_tokens=6,
        temperature=TEMPERATURE,
        beta=BETA,
        ema_decay=0.0,
        policy_optim=optim,
        missing_eos_penalty=None,
    )
    return PPOConfig(**(settings | changes))


@functools.cache
def rollout(truncation: tuple, placement: str, kind: str):
    """`(config, state, frozen, exp)` of one rollout, made once per module for the settings
    its compiled program depends on (sampling, where the KL goes and the estimator it is
    computed with), so cases that differ only in their update share it."""
    config, params = tiny_model(n_layers=1)
    ppo = make_ppo(kl_penalty=placement, kl_estimator=kind, **dict(truncation))
    algo = RLAlgorithm.from_config(ppo)
    state = init_rl_state(params, None, make_optimizer(ppo.policy_optim, 4), None, ppo)
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    frozen = Frozen(params, rm)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(13, 61, (ppo.rollout_batch, 4)), jnp.int32)
    mask = jnp.ones((ppo.rollout_batch, 4), jnp.float32)
    exp, _ = jax.jit(make_experience_fn(config, None, config, ppo, algo, EOS, 0))(
        state, frozen, ids, mask, jax.random.key(0)
    )
    return config, state, frozen, exp


def setup(**changes):
    """`(config, ppo, algo, state, frozen, exp)`: the update's settings `changes`, with a
    rollout made under the same sampling and KL settings. With the KL in the loss the rollout
    computes it (for its metrics) with k3 whatever the loss's estimator: the update reads only
    the log-probs, which do not depend on the estimator (checked below against NumPy)."""
    ppo = make_ppo(**changes)
    algo = RLAlgorithm.from_config(ppo)
    truncation = tuple(sorted((k, changes[k]) for k in ("top_k", "top_p") if k in changes))
    kind = "k3" if ppo.kl_penalty == "loss" else ppo.kl_kind
    config, state, frozen, exp = rollout(truncation, ppo.kl_penalty, kind)
    # The optimizer's settings belong to the update (the rollout's state holds its moments).
    state = init_rl_state(state.policy.params, None, make_optimizer(ppo.policy_optim, 4), None, ppo)
    return config, ppo, algo, state, frozen, exp


def logits_of(config, params, exp):
    p = exp.sequence_ids.shape[1] - exp.response_ids.shape[1]
    lg = response_logits(config, params, exp.sequence_ids, exp.sequence_mask, p)
    return np.asarray(lg, np.float64) / TEMPERATURE


def unpack(words, vocab_size):
    as_bytes = np.ascontiguousarray(np.asarray(words, "<u4")).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, bitorder="little")[..., :vocab_size].astype(bool)


def np_kept(z, top_k=None, top_p=None):
    """The tokens top-k then top-p keep from one row of scaled logits (the definition)."""
    order = np.argsort(-z, kind="stable")
    keep = np.ones(z.shape, bool)
    if top_k is not None:
        keep[:] = z >= z[order[top_k - 1]]
    if top_p is not None:
        kept = order[keep[order]]
        p = np.exp(z[kept] - z[kept].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        keep[:] = False
        keep[kept[before < top_p]] = True
    return keep


def np_logprobs(z, tokens, support):
    """log softmax(z) renormalised over support u {token}, per position."""
    onehot = np.arange(z.shape[-1]) == tokens[..., None]
    zk = np.where(support | onehot, z, -np.inf)
    lse = np.logaddexp.reduce(zk, axis=-1)
    return np.take_along_axis(z, tokens[..., None], -1)[..., 0] - lse


def np_kl(d, kind):
    return {"k1": d, "k2": d * d / 2, "k3": np.exp(-d) - 1 + d, "abs": np.abs(d)}[kind]


TOP_K, TOP_P, BOTH = dict(top_k=3), dict(top_p=0.6), dict(top_k=5, top_p=0.7)
# Every estimator in the loss and three in the reward, under top-k, top-p and both (a
# covering set rather than the full product: each case compiles its own programs).
CASES = [
    (TOP_K, "loss", "k1"), (TOP_K, "loss", "k2"), (TOP_K, "loss", "k3"), (TOP_K, "loss", "abs"),
    (TOP_K, "reward", "k3"), (TOP_P, "loss", "k3"), (TOP_P, "reward", "k1"),
    (TOP_P, "reward", "k2"), (BOTH, "loss", "k3"),
]  # fmt: skip


@pytest.mark.parametrize("truncation,placement,kind", CASES, ids=str)
def test_update_under_truncation_follows_the_convention(truncation, placement, kind):
    config, ppo, algo, state, frozen, exp = setup(
        kl_penalty=placement, kl_estimator=kind, **truncation
    )
    mask = np.asarray(exp.response_mask) > 0
    tokens = np.asarray(exp.response_ids)
    assert mask.any() and not mask.all()  # real and padded positions both
    v = config.vocab_size
    support = unpack(exp.support, v)
    z_old = logits_of(config, state.policy.params, exp)

    # The recorded support is top-k / top-p of the sampling logits and holds the token.
    for b, t in zip(*np.nonzero(mask)):
        np.testing.assert_array_equal(support[b, t], np_kept(z_old[b, t], **truncation))
        assert support[b, t, tokens[b, t]]
    assert not support[~mask].any()
    # Sampler, reference: log-probs over that support (the reference is the same weights
    # here, so the KL starts at 0 exactly as it should).
    old = np_logprobs(z_old, tokens, support)
    np.testing.assert_allclose(np.asarray(exp.logprobs)[mask], old[mask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp.ref_logprobs)[mask], old[mask], atol=2e-5)

    # A moved policy (as after earlier minibatches or epochs): some sampled tokens are now
    # outside its own top-k / top-p, and still get a finite log-prob over the recorded set.
    key = jax.random.key(7)
    moved = jax.tree.map(
        lambda w: w + 0.3 * jax.random.normal(jax.random.fold_in(key, w.size), w.shape, w.dtype),
        state.policy.params,
    )
    z_new = logits_of(config, moved, exp)
    left = [not np_kept(z_new[b, t], **truncation)[tokens[b, t]] for b, t in zip(*np.nonzero(mask))]
    assert any(left)
    state = state.replace(policy=state.policy.replace(params=moved))
    update = jax.jit(make_update_fn(config, None, ppo, algo))
    new_state, metrics = update(state, exp, None, jax.random.key(1))

    assert all(np.isfinite(float(x)) for x in metrics.values())
    assert float(metrics["ppo/policy/skipped_updates"]) == 0
    pairs = list(zip(jax.tree.leaves(new_state.policy.params), jax.tree.leaves(moved)))
    assert all(np.all(np.isfinite(np.asarray(w))) for w, _ in pairs)
    assert any(not np.array_equal(w, w0) for w, w0 in pairs)  # the update was applied

    new = np_logprobs(z_new, tokens, support)
    ref = np.asarray(exp.ref_logprobs)
    tokens_n = mask.sum()
    # The policy loss (PPO-clip, token mean) with the ratio over the recorded support.
    adv = np.asarray(exp.advantages)
    ratio = np.exp(np.where(mask, new - np.asarray(exp.logprobs), 0.0))
    clipped = np.clip(ratio, 0.8, 1.2)
    per_token = np.maximum(-adv * ratio, -adv * clipped)
    np.testing.assert_allclose(
        metrics["ppo/policy/loss"], per_token[mask].sum() / tokens_n, rtol=2e-4, atol=1e-6
    )
    if placement == "loss":
        kl = np_kl(new - ref, kind)
        np.testing.assert_allclose(
            metrics["ppo/kl_loss"], kl[mask].sum() / tokens_n, rtol=2e-4, atol=1e-6
        )
    else:  # in the reward, from the sampler's log-probs; the loss holds no KL term
        assert "ppo/kl_loss" not in metrics
        kl = np.where(mask, np_kl(np.asarray(exp.logprobs) - ref, kind), 0.0)
        np.testing.assert_allclose(exp.kl, kl, atol=1e-6)
        last = mask.sum(1) - 1
        rewards = -BETA * kl
        rewards[np.arange(len(last)), last] += np.asarray(exp.scores)
        np.testing.assert_allclose(exp.rewards, rewards, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("truncation", [TOP_K, TOP_P], ids=str)  # the rollouts above
def test_epochs_of_large_updates_under_truncation_never_skip(truncation):
    """Two epochs of two minibatches at a large learning rate with k3 in the loss: the policy
    moves between minibatches (its top-k changes) and every update still applies."""
    optim = OptimConfig(lr=0.3, grad_clip=0.0, eps=1e-4)
    config, ppo, algo, state, frozen, exp = setup(
        kl_penalty="loss", epochs=2, minibatch_size=4, policy_optim=optim, **truncation
    )
    update = jax.jit(make_update_fn(config, None, ppo, algo))
    new_state, metrics = update(state, exp, None, jax.random.key(1))
    assert float(metrics["ppo/policy/skipped_updates"]) == 0
    assert all(np.isfinite(float(x)) for x in metrics.values())
    assert float(metrics["ppo/kl_loss"]) > 0
    z = logits_of(config, new_state.policy.params, exp)
    mask = np.asarray(exp.response_mask) > 0
    tokens = np.asarray(exp.response_ids)
    moved_out = [
        not np_kept(z[b, t], **truncation)[tokens[b, t]] for b, t in zip(*np.nonzero(mask))
    ]
    assert any(moved_out)  # the scenario happened: a sampled token left the kept set
