"""Logical-axis rules, state and batch shardings, mesh sizes and their errors, in-process.

Rules only need the mesh's axis sizes, so an AbstractMesh stands in for 8 devices here.
"""

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_config

from rlhf_jax.config import DEFAULT_RULES, MeshConfig, OptimConfig, PPOConfig
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.models import scalar_trunk
from rlhf_jax.sharding import (
    batch_sharding,
    check_batch_divisible,
    data_parallel_size,
    local_batch_rows,
    logical_to_mesh_spec,
    make_global_batch,
    make_mesh,
    mesh_shape,
    model_param_shardings,
    replicated,
    state_shardings,
    tree_shardings_like,
)
from rlhf_jax.steps import TrainState, init_rl_state, make_optimizer

RULES = dict(DEFAULT_RULES)
CONFIG = tiny_config(vocab_size=64, n_kv_heads=4, mlp_dim=64)


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


def test_logical_names_map_through_the_rules_and_size_one_axes_drop():
    mesh = abstract_mesh(2, 4, 1)
    assert logical_to_mesh_spec(P("vocab", "embed"), RULES, mesh) == P(None, "fsdp")
    assert logical_to_mesh_spec(P("batch", None), RULES, mesh) == P(("data", "fsdp"))
    mesh = abstract_mesh(1, 2, 4)
    spec = P("layers", "embed", "heads", "head_dim")
    assert logical_to_mesh_spec(spec, RULES, mesh) == P(None, "fsdp", "tensor")
    assert logical_to_mesh_spec(P("batch"), RULES, mesh) == P("fsdp")


def test_indivisible_dimensions_replicate_and_an_axis_is_used_once():
    mesh = abstract_mesh(1, 4, 2)
    rules = {**RULES, "vocab": "fsdp"}
    # both dimensions ask for fsdp: the first takes it
    assert logical_to_mesh_spec(P("vocab", "embed"), rules, mesh, (64, 32)) == P("fsdp")
    # 61 rows do not split 4 ways: vocab is replicated, so embed may use fsdp
    assert logical_to_mesh_spec(P("vocab", "embed"), rules, mesh, (61, 32)) == P(None, "fsdp")
    # 2 KV heads on a 4-way tensor axis stay whole
    mesh = abstract_mesh(1, 1, 4)
    assert logical_to_mesh_spec(P(None, "kv_heads"), RULES, mesh, (32, 2)) == P()


def test_rules_naming_unknown_axes_are_config_errors():
    mesh = abstract_mesh(2, 2, 2)
    with pytest.raises(RlhfJaxError, match=r"mesh\.rules\.embed.*'model'"):
        logical_to_mesh_spec(P("embed"), {**RULES, "embed": "model"}, mesh)
    with pytest.raises(RlhfJaxError, match="'experts'.*mesh.rules"):
        logical_to_mesh_spec(P("experts"), RULES, mesh)


def test_model_shardings_follow_the_rules():
    mesh = abstract_mesh(1, 2, 4)
    shardings = model_param_shardings(CONFIG, mesh, RULES)
    assert shardings["embed"].spec == P("tensor", "fsdp")
    assert shardings["layers"]["mlp"]["down"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shardings["final_norm"]["scale"].spec == P("fsdp")
    scalar = model_param_shardings(CONFIG, mesh, RULES, scalar=True)
    assert scalar["head"]["kernel"].spec == P("fsdp")
    assert scalar["head"]["bias"].spec == P()
    assert scalar["trunk"]["embed"] == shardings["embed"]


def abstract_params():
    from rlhf_jax.models import param_shapes

    return param_shapes(CONFIG)


def test_optimizer_moments_follow_their_params_and_counters_replicate():
    mesh = abstract_mesh(1, 8, 1)
    params = abstract_params()
    p_sh = model_param_shardings(CONFIG, mesh, RULES)
    tx = make_optimizer(OptimConfig(grad_accum=1), 10)
    state = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
    sh = state_shardings(state, mesh, (params, p_sh))
    assert sh.params == p_sh
    adam = sh.opt_state.inner_state[1][0]
    assert adam.mu["embed"] == p_sh["embed"] and adam.nu["embed"].spec == P(None, "fsdp")
    assert jax.tree.structure(adam.mu) == jax.tree.structure(p_sh)
    assert adam.count == replicated(mesh) and sh.step == replicated(mesh)
    assert sh.opt_state.notfinite_count == replicated(mesh)
    # optax.MultiSteps keeps accumulated gradients: also like the params
    multi = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2)
    opt = jax.eval_shape(multi.init, params)
    opt_sh = tree_shardings_like(opt, params, p_sh, mesh)
    assert opt_sh.acc_grads["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp")
    assert opt_sh.mini_step == replicated(mesh)


def test_rl_state_shardings_with_and_without_ema_and_critic():
    """One generic rule serves any state: copies of the policy's weights (params, Adam
    moments, EMA) shard like them, the critic's like the critic's, the rest replicates."""
    mesh = abstract_mesh(2, 2, 2)
    params = abstract_params()
    head = {"kernel": params["final_norm"]["scale"], "bias": jax.ShapeDtypeStruct((), np.float32)}
    value = {"trunk": scalar_trunk(params), "head": head}  # a critic has no LM head
    pol_sh = model_param_shardings(CONFIG, mesh, RULES)
    val_sh = model_param_shardings(CONFIG, mesh, RULES, scalar=True)
    tx = make_optimizer(OptimConfig(), 4)
    for decay, critic in ((0.99, value), (0.0, value), (0.99, None)):
        init = functools.partial(
            init_rl_state,
            policy_tx=tx,
            critic_tx=tx if critic is not None else None,
            ppo=PPOConfig(ema_decay=decay),
        )
        state = jax.eval_shape(init, params, critic)
        sh = state_shardings(state, mesh, (params, pol_sh), (critic, val_sh))
        assert sh.policy.params == pol_sh
        assert sh.policy.opt_state.inner_state[1][0].mu == pol_sh
        if critic is not None:
            assert sh.critic.params == val_sh
        else:
            assert state.critic is None and sh.critic is None
        assert sh.beta == replicated(mesh) and sh.iteration == replicated(mesh)
        assert (sh.ema_params == pol_sh) if decay else sh.ema_params is None
        # one sharding per array of the state
        assert len(jax.tree.leaves(sh)) == len(jax.tree.leaves(state))


def test_batch_shardings_and_data_parallel_size():
    mesh = abstract_mesh(2, 2, 2)
    assert data_parallel_size(mesh, RULES) == 4
    assert batch_sharding(mesh, RULES, 3).spec == P(("data", "fsdp"))
    assert batch_sharding(mesh, RULES, 4, batch_axis=2).spec == P(None, None, ("data", "fsdp"))
    assert batch_sharding(mesh, RULES, 0).spec == P()
    check_batch_divisible(8, mesh, RULES, "rm.batch_size")
    with pytest.raises(RlhfJaxError, match=r"'rm\.batch_size'.*6.*mesh\.data=2 x mesh\.fsdp=2"):
        check_batch_divisible(6, mesh, RULES, "rm.batch_size")


def test_mesh_sizes_resolve_minus_one_or_name_the_keys():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2), 8) == (4, 2, 1)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=4), 8) == (1, 2, 4)
    with pytest.raises(RlhfJaxError, match=r"mesh\.data=3.*do not divide the 8 devices"):
        mesh_shape(MeshConfig(data=3, fsdp=-1), 8)
    with pytest.raises(RlhfJaxError, match=r"mesh\.data=2 x mesh\.fsdp=2 x mesh\.tensor=1 = 4"):
        mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(RlhfJaxError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_single_device_mesh_and_batches():
    mesh = make_mesh(MeshConfig())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert set(mesh.axis_types) == {AxisType.Auto}
    with pytest.raises(RlhfJaxError, match="mesh.data=2"):
        make_mesh(MeshConfig(data=2), devices=jax.devices()[:1])
    assert local_batch_rows(6, mesh, RULES) == slice(0, 6)
    batch = {"ids": np.arange(12).reshape(6, 2), "w": np.ones((6,), np.float32)}
    got = make_global_batch(batch, mesh, RULES, "sft.batch_size")
    assert isinstance(got["ids"].sharding, NamedSharding)
    np.testing.assert_array_equal(got["ids"], batch["ids"])
