"""The contract every registered loss keeps, whatever its math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import get_loss, registered_losses
from rlhf_jax.types import LossOut

B, T, V, K = 3, 6, 7, 5


def _prefix(lengths, t):
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float32)


def _shifted_free(target_mask_BT):
    """Logits at t score token t + 1: position t is free when token t + 1 is not a target;
    the last position scores nothing."""
    free = np.ones_like(target_mask_BT, dtype=bool)
    free[:, :-1] = target_mask_BT[:, 1:] == 0
    return free


def make_inputs(kind, seed=0):
    """`(outputs, batch, free)`: free[key] marks the output entries the loss must ignore."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    if kind in ("sft", "ptx"):
        ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
        attn = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1] * 6], np.float32)
        outputs = {"logits": normal(B, T, V) * 2}
        if kind == "sft":
            loss_mask = np.zeros((B, T), np.float32)
            loss_mask[0, 4:6] = loss_mask[1, 2:4] = loss_mask[2, 1:6] = 1.0
            batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
            free = _shifted_free(loss_mask)
        else:
            batch = {"input_ids": ids, "attention_mask": attn}
            pairs = np.zeros((B, T), np.float32)
            pairs[:, 1:] = attn[:, :-1] * attn[:, 1:]  # token t is scored from a real context
            free = _shifted_free(pairs)
        return outputs, batch, {"logits": free[..., None].repeat(V, -1)}
    if kind == "reward":
        ks = [2, 5, 3]
        mask = _prefix(ks, K)
        rank = np.stack([np.concatenate([rng.permutation(k), np.zeros(K - k, int)]) for k in ks])
        rank[2, :3] = [0, 1, 1]  # a tie
        batch = {"rank": rank.astype(np.int32), "completion_mask": mask}
        return {"rewards": normal(B, K)}, batch, {"rewards": mask == 0}
    mask = _prefix([6, 3, 1], T)
    if kind == "policy":
        old = -np.abs(normal(B, T))
        outputs = {"logprobs": old + 0.2 * normal(B, T), "entropy": np.abs(normal(B, T))}
        batch = {"old_logprobs": old, "advantages": normal(B, T), "response_mask": mask}
        return outputs, batch, {"logprobs": mask == 0, "entropy": mask == 0}
    if kind == "value":
        old = normal(B, T)
        outputs = {"values": old + 0.3 * normal(B, T)}
        batch = {"old_values": old, "returns": normal(B, T), "response_mask": mask}
        return outputs, batch, {"values": mask == 0}
    raise AssertionError(f"no input factory for loss kind {kind!r}: add one here")


ALL = [(kind, name) for kind, names in registered_losses().items() for name in names]


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_loss_contract(kind, name):
    fn = get_loss(kind, name)
    outputs, batch, free = make_inputs(kind)
    out = fn(outputs, batch)

    assert isinstance(out, LossOut)
    assert jnp.shape(out.loss) == () and np.isfinite(out.loss)
    assert out.metrics, "a loss reports at least its own value"
    for key, value in out.metrics.items():
        assert "/" in key, key
        assert jnp.shape(value) == () and np.isfinite(value), key

    # Masked positions / completions are ignored: overwrite them with large junk.
    rng = np.random.default_rng(1)
    junk = {
        k: np.where(free[k], rng.normal(size=np.shape(v)) * 1e3, v).astype(np.float32)
        if k in free
        else v
        for k, v in outputs.items()
    }
    assert any(np.any(f) for f in free.values())
    junk_out = fn(junk, batch)
    np.testing.assert_allclose(junk_out.loss, out.loss, rtol=1e-6, atol=1e-6)
    for key in out.metrics:
        np.testing.assert_allclose(junk_out.metrics[key], out.metrics[key], rtol=1e-6, atol=1e-6)

    jitted = jax.jit(fn)(outputs, batch)
    np.testing.assert_allclose(jitted.loss, out.loss, rtol=1e-5, atol=1e-6)

    # Finite gradients that never reach masked entries, even when those hold junk.
    grad_fn = jax.grad(lambda o: fn(o, batch).loss)
    for point in (outputs, junk):
        grads = grad_fn(jax.tree.map(jnp.asarray, point))
        for key, g in grads.items():
            g = np.asarray(g)
            assert np.all(np.isfinite(g)), key
            if key in free:
                assert np.all(g[free[key]] == 0), f"{key}: gradient leaks into masked entries"
        assert any(np.any(np.asarray(g) != 0) for g in grads.values())
