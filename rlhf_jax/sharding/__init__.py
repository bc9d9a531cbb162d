"""Scale-out: the device mesh, logical-axis rules, shardings of states and batches, sharded
initialisation, jit with shardings, and multi-process start-up.

The only package (with config) that names mesh axes ("data", "fsdp", "tensor"): models name
their weights' dimensions logically, and `mesh.rules` maps those names to mesh axes, so the
same model and steps run on one CPU or a pod. Typical use in a loop:

    initialize(cfg.distributed)                       # first, before any device is touched
    mesh = make_mesh(cfg.mesh)
    p_sh = model_param_shardings(model_config, mesh, cfg.mesh.rules)
    state, st_sh = init_sharded_state(lambda p: TrainState.create(p, tx), (params,), (p_sh,), mesh)
    step = jit_step(make_sft_step(...), st_sh, batch_sharding(mesh, cfg.mesh.rules, 1),
                    activation_rules=activation_rules(cfg.mesh.rules, cfg.mesh.activation_rules))
    rows = local_batch_rows(cfg.sft.batch_size, mesh, cfg.mesh.rules, "sft.batch_size")
    local = {k: v[rows] for k, v in host_batch.items()}   # this process's rows only
    batch = make_global_batch(local, mesh, cfg.mesh.rules, "sft.batch_size")
    state, metrics = step(state, batch, key)
"""

from rlhf_jax.sharding.activations import (
    activation_rules,
    activation_sharding,
    with_activation_sharding,
)
from rlhf_jax.sharding.distributed import initialize
from rlhf_jax.sharding.jit import (
    jit_eval,
    jit_experience,
    jit_finish,
    jit_sample,
    jit_step,
    jit_update,
)
from rlhf_jax.sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from rlhf_jax.sharding.place import (
    check_batch_divisible,
    host_local_rows,
    init_sharded,
    init_sharded_state,
    local_batch_rows,
    make_global_batch,
    shard_tree,
)
from rlhf_jax.sharding.rules import (
    batch_axes,
    batch_sharding,
    batch_shardings_like,
    data_parallel_size,
    logical_to_mesh_spec,
    model_param_shardings,
    param_shardings,
    replicated,
    shardings_from_params,
    tree_shardings_like,
)
from rlhf_jax.sharding.states import experience_shardings, state_shardings

__all__ = [
    "MESH_AXES",
    "activation_rules",
    "activation_sharding",
    "batch_axes",
    "batch_sharding",
    "batch_shardings_like",
    "check_batch_divisible",
    "data_parallel_size",
    "experience_shardings",
    "host_local_rows",
    "init_sharded",
    "init_sharded_state",
    "initialize",
    "jit_eval",
    "jit_experience",
    "jit_finish",
    "jit_sample",
    "jit_step",
    "jit_update",
    "local_batch_rows",
    "logical_to_mesh_spec",
    "make_global_batch",
    "make_mesh",
    "mesh_shape",
    "model_param_shardings",
    "param_shardings",
    "replicated",
    "shard_tree",
    "shardings_from_params",
    "state_shardings",
    "tree_shardings_like",
    "with_activation_sharding",
]
