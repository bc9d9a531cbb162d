"""LoRA adapters: an adapted model starts as its base, trains only its adapters, folds into
weights transformers loads, shards like its base and checkpoints without the base."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hf_fixtures import load_hf_torch, make_tiny_checkpoint, torch_logits
from tiny import tiny_model

from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.losses import get_loss
from rlhf_jax.models import forward, load_hf, param_logical_axes, save_hf
from rlhf_jax.models.lora import (
    count_params,
    fold_adapters,
    init_adapters,
    merge_trees,
    split_adapters,
    with_lora,
)
from rlhf_jax.sharding.rules import logical_to_mesh_spec
from rlhf_jax.steps import TrainState, make_sft_step
from rlhf_jax.steps.state import with_frozen_of, without_frozen

ALL = ("q", "k", "v", "o", "gate", "up", "down")
IDS = np.array([[5, 9, 3, 17, 2, 40, 11, 7], [0, 0, 12, 8, 33, 4, 9, 21]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)


def _perturbed(adapters, seed=1, scale=0.05):
    """Adapters as after some training (B no longer zero)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_b_equals_base_exactly_and_adapters_change_it(family):
    switches = {"llama": {}, "gpt2": dict(
        model_type="gpt2", norm="layernorm", activation="gelu_new", gated_mlp=False,
        position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
        n_kv_heads=4,
    )}[family]  # fmt: skip
    cfg, base = tiny_model(**switches)
    lcfg = with_lora(cfg, 4, 8.0, ALL)
    adapters = init_adapters(lcfg, jax.random.key(1))
    # Every projection the family has got A [*in, r] and B [r, *out], stacked over layers.
    expected = {"q", "k", "v", "o", "up", "down"} | ({"gate"} if cfg.gated_mlp else set())
    assert set(adapters["layers"]["attn"]) | set(adapters["layers"]["mlp"]) == expected
    o = adapters["layers"]["attn"]["o"]
    assert o["lora_a"].shape == (2, cfg.n_heads, cfg.head_dim, 4)
    assert o["lora_b"].shape == (2, 4, cfg.d_model)
    assert not np.any(np.asarray(o["lora_b"]))
    before = forward(cfg, base, IDS, MASK)
    np.testing.assert_array_equal(forward(lcfg, merge_trees(base, adapters), IDS, MASK), before)
    trained = merge_trees(base, _perturbed(adapters))
    assert float(jnp.max(jnp.abs(forward(lcfg, trained, IDS, MASK) - before))) > 1e-2
    # Split and merge are inverses; the base part has exactly the base's structure.
    b, a = split_adapters(trained)
    assert jax.tree.structure(b) == jax.tree.structure(base)
    assert count_params(a) == count_params(adapters)


def test_merged_save_loads_in_transformers_and_matches_the_adapter_forward(tmp_path):
    """The folded weights, saved as a Hugging Face checkpoint, give transformers' own model
    the logits of the adapted forward (adapters as two thin matmuls, never merged)."""
    folder = make_tiny_checkpoint("qwen2", tmp_path / "base")
    cfg, base = load_hf(folder)
    lcfg = with_lora(cfg, 4, 16.0, ALL)
    adapted = merge_trees(base, _perturbed(init_adapters(lcfg, jax.random.key(3))))
    ours = np.asarray(forward(lcfg, adapted, IDS, MASK))
    base_cfg, folded = fold_adapters(lcfg, adapted)
    assert base_cfg.lora_rank == 0 and jax.tree.structure(folded) == jax.tree.structure(base)
    out = save_hf(base_cfg, folded, tmp_path / "merged")
    theirs = torch_logits(load_hf_torch(out), IDS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(theirs[real], ours[real], atol=2e-4, rtol=1e-4)
    assert np.abs(ours - np.asarray(forward(cfg, base, IDS, MASK)))[real].max() > 1e-2


def test_gradients_reach_only_the_adapters():
    """A LoRA SFT step: the optimizer holds the adapters' moments alone, the base does not
    move by a bit, the adapters do, and the gradient of the base is never formed."""
    cfg, base = tiny_model()
    lcfg = with_lora(cfg, 4, 8.0, ("q", "v", "down"))
    # (as after a first step: with B still zero, A's gradient is zero too)
    adapters = _perturbed(init_adapters(lcfg, jax.random.key(1)))
    state = TrainState.create(adapters, optax.adam(1e-2), frozen=base)
    mu = state.opt_state[0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(adapters)
    step = jax.jit(make_sft_step(lcfg, get_loss("sft")))
    batch = {"input_ids": IDS, "attention_mask": MASK, "loss_mask": MASK}
    jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(0))
    new, metrics = step(state, batch, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, new.frozen, base)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, adapters)
    assert all(v > 0 for v in jax.tree.leaves(moved)), moved
    assert float(metrics["train/grad_norm"]) > 0
    # No output or intermediate of the step has the shape of the MLP's down kernel's
    # gradient other than the kernel passed through: the base's gradients do not exist.
    down = base["layers"]["mlp"]["down"]["kernel"].shape
    outs = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v, "aval")]
    assert outs.count(down) <= 1, outs.count(down)


def test_adapters_carry_logical_axes_and_shard_like_their_kernel():
    cfg, _ = tiny_model()
    axes = param_logical_axes(with_lora(cfg, 4, 8.0, ALL))["layers"]
    assert tuple(axes["attn"]["q"]["lora_a"]) == ("layers", "embed", None)
    assert tuple(axes["attn"]["q"]["lora_b"]) == ("layers", None, "heads", "head_dim")
    assert tuple(axes["mlp"]["down"]["lora_a"]) == ("layers", "mlp", None)
    mesh = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "layers": None, "head_dim": None}
    spec = logical_to_mesh_spec(axes["attn"]["q"]["lora_a"], rules, mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    spec = logical_to_mesh_spec(axes["attn"]["q"]["lora_b"], rules, mesh)
    assert spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_checkpoints_hold_only_what_trains(tmp_path):
    cfg, base = tiny_model()
    lcfg = with_lora(cfg, 2, 4.0, ("q",))
    state = TrainState.create(init_adapters(lcfg, jax.random.key(1)), optax.adam(1e-3), base)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, without_frozen(state), {"step": 1})
        names = ckpt.saved_names()
        assert names and all("lora_" in n or n in ("step", "opt_state/0/count") for n in names)
        restored, _ = ckpt.restore(target=without_frozen(state))
    restored = with_frozen_of(restored, state)
    assert restored.frozen is state.frozen
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_adapters_written_alone_load_in_peft(tmp_path):
    """`save_adapters` writes what PEFT loads onto transformers' base model: the same logits
    as our adapted forward."""
    from peft import PeftModel

    from rlhf_jax.models.hf.adapters import save_adapters

    folder = make_tiny_checkpoint("llama", tmp_path / "base")
    cfg, base = load_hf(folder)
    lcfg = with_lora(cfg, 4, 16.0, ("q", "k", "o", "up", "down"))
    adapters = _perturbed(init_adapters(lcfg, jax.random.key(3)))
    ours = np.asarray(forward(lcfg, merge_trees(base, adapters), IDS, MASK))
    out = save_adapters(lcfg, adapters, tmp_path / "adapter", base_model=str(folder))
    model = PeftModel.from_pretrained(load_hf_torch(folder), str(out)).eval()
    theirs = torch_logits(model, IDS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(theirs[real], ours[real], atol=2e-4, rtol=1e-4)
