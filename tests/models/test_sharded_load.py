"""load_hf(shardings=...) places each weight straight into its shards, on a simulated mesh.

Runs in a subprocess: the device count must be set before JAX starts.
"""

import sys
import textwrap

from processes import run

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, sys.argv[2])
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from tiny import tiny_model
    from rlhf_jax.models import load_hf, param_logical_axes, save_hf

    assert jax.device_count() == 4
    config, params = tiny_model(mlp_dim=64, vocab_size=64)
    save_hf(config, params, sys.argv[1])
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    # logical name -> mesh axis, as the sharding rules will do it
    rules = {"embed": "a", "mlp": "b", "heads": "b", "vocab": "b"}

    def to_sharding(spec):
        return NamedSharding(mesh, P(*[rules.get(name) for name in spec]))

    axes = param_logical_axes(config)
    shardings = jax.tree.map(to_sharding, axes, is_leaf=lambda x: isinstance(x, P))
    _, sharded = load_hf(sys.argv[1], shardings=shardings)
    _, plain = load_hf(sys.argv[1])
    flat_sharded = jax.tree_util.tree_leaves_with_path(sharded)
    flat_plain = jax.tree.leaves(plain)
    flat_shardings = jax.tree.leaves(shardings)
    for (path, got), want, sharding in zip(flat_sharded, flat_plain, flat_shardings):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == sharding, (path, got.sharding)
    emb = sharded["embed"]  # [vocab, embed] over ("b", "a"): each device holds a quarter
    shard = emb.addressable_shards[0].data
    assert shard.shape == (emb.shape[0] // 2, emb.shape[1] // 2), shard.shape
    q = sharded["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)

    # A reward model too: its trunk shard by shard, its head placed.
    from rlhf_jax.models import init_scalar_head, load_scalar_model, save_scalar_model
    from rlhf_jax.models.heads import scalar_model_logical_axes
    rm = {"trunk": params, "head": init_scalar_head(config, jax.random.key(1))}
    save_scalar_model(config, rm, sys.argv[1] + "_rm")

    def rm_shardings(cfg):
        axes = scalar_model_logical_axes(cfg)
        return jax.tree.map(to_sharding, axes, is_leaf=lambda x: isinstance(x, P))

    _, rm_sharded = load_scalar_model(sys.argv[1] + "_rm", shardings=rm_shardings)
    _, rm_plain = load_scalar_model(sys.argv[1] + "_rm")
    for got, want in zip(jax.tree.leaves(rm_sharded), jax.tree.leaves(rm_plain)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    emb = rm_sharded["trunk"]["embed"]
    assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)
    assert rm_sharded["head"]["kernel"].sharding == to_sharding(P("embed"))
    print("OK")
    """
)


def test_load_hf_builds_each_shard_on_its_device(tmp_path):
    tests_dir = str(__import__("pathlib").Path(__file__).parent.parent)
    proc = run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt"), tests_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
