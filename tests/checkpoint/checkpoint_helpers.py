"""Helpers shared by the checkpoint tests."""

import jax
import jax.numpy as jnp
import numpy as np


def sft_rows(n, t=8, seed=0):
    """`n` rows of SFT arrays (targets after the first 3 tokens)."""
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((n, t), np.float32)
    loss_mask[:, 3:] = 1
    return {
        "input_ids": rng.integers(3, 61, (n, t)).astype(np.int32),
        "attention_mask": np.ones((n, t), np.float32),
        "loss_mask": loss_mask,
    }


def assert_trees_equal(a, b):
    """Same structure, and every leaf equal bit for bit with the same dtype."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def fresh_like(state):
    """A state of the same structure, dtypes and shardings with other values, as a new
    process would build before restoring."""
    return jax.tree.map(lambda x: jnp.full_like(x, 7), state)
