"""One process of a 2-process CPU run (4 simulated devices each), started by
test_sharding_multiprocess.py with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set.

Each process loads only its rows of a global batch, builds the global array, and runs a jitted
function over an FSDP-sharded weight; prints one JSON line to compare with NumPy.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from rlhf_jax.config import DistributedConfig, MeshConfig  # noqa: E402
from rlhf_jax.errors import RlhfJaxError  # noqa: E402
from rlhf_jax.sharding import initialize  # noqa: E402

started = initialize(DistributedConfig())  # before anything touches devices

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from result_line import emit  # noqa: E402

from rlhf_jax.sharding import (  # noqa: E402
    batch_sharding,
    local_batch_rows,
    make_global_batch,
    make_mesh,
    replicated,
    shard_tree,
)

cfg = MeshConfig(data=2, fsdp=2, tensor=2)
mesh, rules = make_mesh(cfg), cfg.rules
x_full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
w_full = np.linspace(-1, 1, 6 * 4, dtype=np.float32).reshape(6, 4)
rows = local_batch_rows(8, mesh, rules, "sft.batch_size")
batch = make_global_batch({"x": x_full[rows]}, mesh, rules, "sft.batch_size")
w = shard_tree(w_full, NamedSharding(mesh, P("fsdp", "tensor")))
f = jax.jit(
    lambda b, w: jnp.sum(jnp.tanh(b["x"] @ w), axis=1),
    in_shardings=(batch_sharding(mesh, rules, 1), w.sharding),
    out_shardings=replicated(mesh),
)
out = np.asarray(f(batch, w))
try:
    make_global_batch({"x": x_full[:3]}, mesh, rules, "ppo.rollout_batch")
    error = None
except RlhfJaxError as e:
    error = str(e)
result = {
    "started": started,
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "rows": [rows.start, rows.stop],
    "global_shape": list(batch["x"].shape),
    "max_error": float(np.max(np.abs(out - np.tanh(x_full @ w_full).sum(1)))),
    "error": error,
}
emit(result)
