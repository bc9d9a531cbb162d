"""Run by test_trim_mesh.py in a subprocess with 4 simulated CPU devices (fixed before JAX
starts): `python trim_script.py TESTS_DIR`. The GRPO update with the KL in the loss through
`TrimmedUpdate` on a (data 2, fsdp 2) mesh, the experience's rows split over the devices,
against the plain update of the whole padded experience on one device; then the same trimmed
and packed (`PackedUpdate`: each device's rows packed among themselves); prints one JSON line
`RESULT {...}` with the trimmed lengths, the packed layout and the largest relative
differences."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "steps")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from result_line import emit  # noqa: E402
from test_rl import setup  # noqa: E402
from test_rl_trim import _padded_experience, _sgd_state  # noqa: E402

from rlhf_jax.config import MeshConfig  # noqa: E402
from rlhf_jax.loops.packed_update import PackedUpdate  # noqa: E402
from rlhf_jax.loops.trimmed_update import TrimmedUpdate  # noqa: E402
from rlhf_jax.sharding import (  # noqa: E402
    experience_shardings,
    jit_update,
    make_mesh,
    model_param_shardings,
    state_shardings,
)
from rlhf_jax.steps import make_update_fn  # noqa: E402


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6)))


def main() -> None:
    changes = {"advantage": "grpo", "samples_per_prompt": 2, "rollout_batch": 4}
    config, ppo, algo, state, _, _, _ = setup(trim_update=True, kl_penalty="loss", **changes)
    state = _sgd_state(state)
    exp = _padded_experience(algo, 8, 6, 8, [3, 1, 2, 3, 1, 2, 3, 2], [3, 1, 2, 0, 3, 1, 2, 3])
    fn = make_update_fn(config, None, ppo, algo)
    key = jax.random.key(3)
    want_state, want = jax.jit(fn)(state, exp, None, key)
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=1)
    mesh, rules = make_mesh(mesh_cfg), mesh_cfg.rules
    pol_sh = model_param_shardings(config, mesh, rules)
    st_sh = state_shardings(state, mesh, (state.policy.params, pol_sh))
    # Each update donates its state, which may share buffers with `state`: a copy for each.
    spare = jax.tree.map(jnp.copy, state)
    placed = jax.device_put(state, st_sh)
    rows = jax.device_put(exp, experience_shardings(mesh, rules))
    update = TrimmedUpdate(jit_update(fn, st_sh, mesh, rules), mesh, rules)
    lengths = update.lengths(rows)
    got_state, got = update(placed, rows, None, key)

    def jitted_for(layout):
        return jit_update(make_update_fn(config, None, ppo, algo, pack=layout), st_sh, mesh, rules)

    packed = PackedUpdate(jitted_for, ppo, mesh, rules, trim=TrimmedUpdate(None, mesh, rules))
    packed_state, packed_metrics = packed(jax.device_put(spare, st_sh), rows, None, key)

    def max_abs(new_state):
        new = (new_state.policy.params, want_state.policy.params)
        return max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(*map(jax.tree.leaves, new)))

    result = {
        "lengths": list(lengths),
        "metrics": {k: rel_diff(got[k], want[k]) for k in want},
        "params_max_abs": max_abs(got_state),
        "response_spec": str(update._trim(rows, *lengths).response_ids.sharding.spec),
        "packed_layout": list(packed.layout(packed.trim.cut(rows), key)),
        "packed_programs": [list(k) for k in packed.programs],
        "packed_metrics": {k: rel_diff(packed_metrics[k], want[k]) for k in want},
        "packed_params_max_abs": max_abs(packed_state),
    }
    emit(result)


if __name__ == "__main__":
    main()
