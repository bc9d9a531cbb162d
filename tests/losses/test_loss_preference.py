"""Preference losses (DPO, IPO, cDPO, robust DPO): for K = 2 against TRL's DPOTrainer loss on the
same per-token log-probs (value and gradient), for K > 2 against the explicit sum over each
prompt's pairs, and prompt tokens and padding never counting."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import Config, load_config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.losses import get_loss
from rlhf_jax.steps.algorithm import resolve_config_parts
from rlhf_jax.steps.preference import completion_logps, completion_token_mask, sum_completion_logps

B, T = 3, 12
PROMPT_LENS = [3, 5, 2]
# completion lengths of (chosen, rejected) per prompt; the rest of each row is padding
COMPLETION_LENS = [(4, 6), (7, 2), (5, 5)]


def _pair_batch(seed=0):
    """A K = 2 ranking batch (completion 0 chosen) and random per-token log-probs of tokens
    1..T-1, junk outside the completions."""
    rng = np.random.default_rng(seed)
    attention = np.zeros((B, 2, T), np.float32)
    for b, (p, lens) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        for k, n in enumerate(lens):
            attention[b, k, : p + n] = 1
    batch = {
        "input_ids": rng.integers(0, 50, size=(B, 2, T)).astype(np.int32),
        "attention_mask": attention,
        "completion_start": np.array(PROMPT_LENS, np.int32),
        "rank": np.tile(np.array([0, 1], np.int32), (B, 1)),
        "completion_mask": np.ones((B, 2), np.float32),
        "ref_logps": (-rng.uniform(2, 12, size=(B, 2))).astype(np.float32),
    }
    token_logps = (-rng.uniform(0.1, 2.0, size=(B, 2, T - 1))).astype(np.float32)
    return batch, token_logps


def _ours(name, token_logps, batch, **hparams):
    loss_fn = get_loss("preference", name, **hparams)

    def loss(tl):
        logps, tokens = sum_completion_logps(tl, batch)
        return loss_fn({"logps": logps}, {**batch, "completion_tokens": tokens}).loss

    value, grad = jax.value_and_grad(loss)(jnp.asarray(token_logps))
    return float(value), np.asarray(grad)


def _trl(loss_type, token_logps, batch, beta, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on these per-token log-probs: a stand-in model returns
    them (zero outside the completion, as TRL's masked labels give) and TRL does the rest."""
    import torch
    from trl import DPOTrainer

    # TRL's batch is [all chosen; all rejected]; its completion_mask marks completion tokens.
    mask = np.asarray(completion_token_mask(batch))  # [B, 2, T]
    completion_mask = torch.tensor(np.concatenate([mask[:, 0], mask[:, 1]]))
    leaf = torch.tensor(np.concatenate([token_logps[:, 0], token_logps[:, 1]]), requires_grad=True)
    outputs = types.SimpleNamespace(
        log_probs=leaf * completion_mask[:, 1:],
        entropy=torch.zeros(2 * B, T - 1),
        mean_logits=torch.zeros(2 * B, T - 1),
        is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool),
    )
    ids = np.concatenate([batch["input_ids"][:, 0], batch["input_ids"][:, 1]])
    attention = np.concatenate([batch["attention_mask"][:, 0], batch["attention_mask"][:, 1]])
    inputs = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(batch["ref_logps"][:, 0]),
        "ref_rejected_logps": torch.tensor(batch["ref_logps"][:, 1]),
    }
    accelerator = types.SimpleNamespace(
        device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        use_weighting=False,
    )
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, False)
    loss.backward()
    grad = leaf.grad.numpy()
    return float(loss.detach()), np.stack([grad[:B], grad[B:]], axis=1)


@pytest.mark.parametrize(
    "ours,trl,hparams",
    [
        ("dpo", "sigmoid", {"beta": 0.1}),
        ("dpo", "sigmoid", {"beta": 0.7}),
        ("ipo", "ipo", {"beta": 0.3}),
        ("robust_dpo", "robust", {"beta": 0.2, "label_smoothing": 0.2}),
    ],
)
def test_k2_equals_trl_dpo_trainer(ours, trl, hparams):
    batch, token_logps = _pair_batch()
    value, grad = _ours(ours, token_logps, batch, **hparams)
    trl_value, trl_grad = _trl(trl, token_logps, batch, **hparams)
    np.testing.assert_allclose(value, trl_value, rtol=1e-5)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-4, atol=1e-7)


def test_label_smoothing_is_conservative_dpo():
    """cDPO by hand: -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d), mean over pairs."""
    batch, token_logps = _pair_batch(1)
    beta, eps = 0.5, 0.15
    value, _ = _ours("dpo", token_logps, batch, beta=beta, label_smoothing=eps)
    mask = np.asarray(completion_token_mask(batch))[..., 1:]
    ratio = (token_logps * mask).sum(-1) - batch["ref_logps"]
    d = beta * (ratio[:, 0] - ratio[:, 1])
    log_sig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    expected = np.mean(-(1 - eps) * log_sig(d) - eps * log_sig(-d))
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_prompt_tokens_and_padding_get_zero_gradient():
    batch, token_logps = _pair_batch(2)
    target = np.asarray(completion_token_mask(batch))[..., 1:] > 0
    for name, hp in (("dpo", {"beta": 0.3}), ("ipo", {"beta": 0.3})):
        _, grad = _ours(name, token_logps, batch, **hp)
        assert np.all(grad[~target] == 0) and np.all(grad[target] != 0), name
    # the first completion token of row 0 is token 3 (prompt of 3): predicted at index 2
    assert target[0, 0, 2] and not target[0, 0, 1] and not target[0, 0, 3 + 4 - 1 + 1]


def _explicit(name, logps, ref, tokens, rank, mask, beta, weighting, eps=0.0):
    """The loss as a plain loop over every prompt's ranked pairs."""
    per_prompt, all_pairs = [], []
    for b in range(logps.shape[0]):
        terms = []
        real = [k for k in range(logps.shape[1]) if mask[b, k]]
        for i in real:
            for j in real:
                if rank[b, i] >= rank[b, j]:
                    continue
                ri, rj = logps[b, i] - ref[b, i], logps[b, j] - ref[b, j]
                if name == "ipo":
                    d = ri / tokens[b, i] - rj / tokens[b, j]
                    terms.append((d - 1 / (2 * beta)) ** 2)
                else:
                    d = beta * (ri - rj)
                    terms.append(
                        -(1 - eps) * np.log(1 / (1 + np.exp(-d)))
                        - eps * np.log(1 / (1 + np.exp(d)))
                    )
        if terms:
            per_prompt.append(np.mean(terms))
            all_pairs += terms
    return np.mean(per_prompt) if weighting == "prompt" else np.mean(all_pairs)


@pytest.mark.parametrize("name,eps", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0)])
@pytest.mark.parametrize("weighting", ["prompt", "pair"])
def test_kwise_equals_the_explicit_sum_over_pairs(name, eps, weighting):
    rng = np.random.default_rng(3)
    k = 5
    mask = np.array(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32
    )
    rank = np.stack([rng.permutation(k) for _ in range(4)]).astype(np.int32)
    rank[3, :4] = [0, 1, 1, 2]  # a tie: no pair between completions 1 and 2
    logps = rng.normal(-8, 3, size=(4, k)).astype(np.float32)
    ref = rng.normal(-8, 3, size=(4, k)).astype(np.float32)
    tokens = rng.integers(1, 20, size=(4, k)).astype(np.float32)
    batch = {"ref_logps": ref, "completion_tokens": tokens, "rank": rank, "completion_mask": mask}
    hp = {"beta": 0.2, "weighting": weighting} | ({"label_smoothing": eps} if eps else {})
    out = get_loss("preference", name, **hp)({"logps": logps}, batch)
    expected = _explicit(name, logps, ref, tokens, rank, mask, 0.2, weighting, eps)
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5)
    assert float(out.metrics["dpo/pairs"]) == 10 + 1 + 3 + 5


def test_padding_tokens_do_not_change_the_log_probs():
    """Junk token ids in every padded position leave each completion's log-prob unchanged."""
    from tiny import tiny_model

    cfg, params = tiny_model()
    batch, _ = _pair_batch(4)
    batch["input_ids"] = batch["input_ids"] % cfg.vocab_size
    junk = dict(batch)
    rng = np.random.default_rng(9)
    noise = rng.integers(0, cfg.vocab_size, size=batch["input_ids"].shape)
    junk["input_ids"] = np.where(batch["attention_mask"] > 0, batch["input_ids"], noise)
    a, tokens = completion_logps(cfg, params, batch)
    b, _ = completion_logps(cfg, params, junk)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert np.asarray(tokens).tolist() == [list(lens) for lens in COMPLETION_LENS]


def test_a_bad_preference_setting_fails_when_the_config_loads():
    for changes, message in (
        (["dpo.loss=dpoo"], "unknown preference loss 'dpoo'"),
        (["dpo.loss=robust_dpo", "dpo.loss_kwargs={label_smoothing: 0.6}"], "label_smoothing"),
        (["dpo.loss_kwargs={weighting: prompts}"], "weighting"),
        # cDPO's eps is a flip probability: 0.5 and above learn nothing or the reverse
        (["dpo.loss_kwargs={label_smoothing: 0.5}"], r"dpo: label_smoothing must be in \[0, 0.5\)"),
        (["compare.preference={c: {loss_kwargs: {label_smoothing: 0.9}}}"], "label_smoothing"),
        (["compare.preference={x: {loss: ipo, loss_kwargs: {eps: 1}}}"], "compare.preference.x"),
    ):
        with pytest.raises(RlhfJaxError, match=message):
            resolve_config_parts(load_config(Config, None, changes))
