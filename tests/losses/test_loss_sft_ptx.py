import math

import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import get_loss, pretrain_nll, sft_cross_entropy, sft_sequence_mean


def _log_softmax(z):
    z = z.astype(np.float64)
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()


def _inputs(seed=0, b=3, t=7, v=11):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, t, v)) * 2).astype(np.float32)
    ids = rng.integers(0, v, size=(b, t))
    # Prompt | completion | padding, different per row (targets are completion tokens only).
    loss_mask = np.zeros((b, t), np.float32)
    for i, (start, end) in enumerate([(2, 7), (4, 6), (1, 3)][:b]):
        loss_mask[i, start:end] = 1.0
    return logits, ids, loss_mask


def test_sft_against_loop():
    logits, ids, loss_mask = _inputs()
    nll, hits, n = [], 0, 0
    per_seq = []
    for b in range(ids.shape[0]):
        row = []
        for t in range(1, ids.shape[1]):
            if loss_mask[b, t]:  # target ids[b, t] is scored by the logits at t - 1
                row.append(-_log_softmax(logits[b, t - 1])[ids[b, t]])
                hits += int(np.argmax(logits[b, t - 1]) == ids[b, t])
                n += 1
        nll += row
        per_seq.append(sum(row) / len(row))
    out = sft_cross_entropy({"logits": logits}, {"input_ids": ids, "loss_mask": loss_mask})
    np.testing.assert_allclose(out.loss, sum(nll) / n, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["sft/loss"], out.loss)
    assert float(out.metrics["sft/tokens"]) == n
    np.testing.assert_allclose(out.metrics["sft/accuracy"], hits / n, rtol=1e-6)
    seq = sft_sequence_mean({"logits": logits}, {"input_ids": ids, "loss_mask": loss_mask})
    np.testing.assert_allclose(seq.loss, sum(per_seq) / len(per_seq), rtol=1e-5)


def test_sft_hand_value():
    # V = 4, uniform logits: every target costs log 4; a perfect logit on the target costs ~0.
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 1, 2] = 50.0  # position 1 predicts ids[2] = 2 with probability ~1
    ids = np.array([[0, 1, 2]])
    mask = np.array([[0.0, 1.0, 1.0]])  # targets: ids[1] (uniform) and ids[2] (certain)
    out = get_loss("sft", "default")({"logits": logits}, {"input_ids": ids, "loss_mask": mask})
    np.testing.assert_allclose(out.loss, (math.log(4) + 0.0) / 2, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["sft/accuracy"], 0.5)  # argmax of uniform is 0 != 1


def test_ptx_against_loop_left_and_right_padding():
    logits, ids, _ = _inputs(seed=1)
    attn = np.array(
        [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.float32
    )
    nll = [
        -_log_softmax(logits[b, t])[ids[b, t + 1]]
        for b in range(3)
        for t in range(6)
        if attn[b, t] and attn[b, t + 1]  # real context predicting a real token
    ]
    out = pretrain_nll({"logits": logits}, {"input_ids": ids, "attention_mask": attn})
    np.testing.assert_allclose(out.loss, sum(nll) / len(nll), rtol=1e-5)
    assert float(out.metrics["ppo/ptx/tokens"]) == len(nll) == 4 + 3 + 6


def test_ptx_hand_value():
    # Uniform over V = 5: -E log pi(x) = log 5 per token.
    out = pretrain_nll(
        {"logits": jnp.zeros((2, 4, 5))},
        {"input_ids": jnp.zeros((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4))},
    )
    np.testing.assert_allclose(out.metrics["ppo/ptx/loss"], math.log(5), rtol=1e-6)
