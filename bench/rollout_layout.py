"""What one decode token costs in collectives under each weight layout, and what resharding
the policy into that layout once per rollout would move (issue 22's rollout layout).

Compiled, never run: the sampling program (`rollout.generate` as `rlhf-jax ppo` jits it,
under the activation rules) on N virtual CPU devices with abstract weights of a real shape
(default the Llama-3.2-1B shape folder: 16 layers, d 2048, vocab 128,256, bf16), one row
per device. Per decode token: the collectives inside the decode loop's body (a loop nested
in it counted times its known trip count), their count and the bytes of their results per
device. Reshard: the program that turns FSDP-sharded weights into the layout.

    python -m bench.rollout_layout [--devices 8] [--shape configs/shapes/llama-3.2-1b]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

LAYOUTS = {  # name -> mesh sizes (data, fsdp, tensor) on N devices
    "fsdp": lambda n: (1, n, 1),
    "replicated": lambda n: (n, 1, 1),
    "tensor": lambda n: (1, 1, n),
    "data2_tensor": lambda n: (2, 1, n // 2),
}
OP = re.compile(
    r"^\s*(?:ROOT )?%?\S+ = (\([^=]*?\)|\S+) "
    r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
WHILE = re.compile(r"while\(.*body=%?([\w.\-]+)(.*)")
TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
CALLS = re.compile(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")
ARRAY = re.compile(r"(pred|s8|u8|s32|u32|bf16|f16|f32|f64)\[([0-9,]*)\]")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "f64": 8}


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO text -> {computation name: its instruction lines}."""
    out, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            out[name].append(line)
    return out


def collectives(
    comps: dict, name: str, seen: tuple = (), loops: bool = True
) -> tuple[float, float]:
    """(count, result bytes per device) of the collectives one run of `name` executes
    (`loops` False: leaving out those inside while loops)."""
    count = size = 0.0
    for line in comps.get(name, []):
        m = OP.match(line)
        if m:
            count += 1
            size += sum(BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                        for t, dims in ARRAY.findall(m.group(1)))  # fmt: skip
            continue
        w = WHILE.search(line)
        if w and not loops:
            continue
        if w and w.group(1) not in seen:
            trip = TRIP.search(line)
            c, s = collectives(comps, w.group(1), (*seen, name))
            k = int(trip.group(1)) if trip else 1
            count, size = count + k * c, size + k * s
            continue
        for called in CALLS.findall(line):
            for sub in re.split(r"[, %]+", called):
                if sub and sub in comps and sub not in seen and "while(" not in line:
                    c, s = collectives(comps, sub, (*seen, name))
                    count, size = count + c, size + s
    return count, size


def decode_body(hlo: str) -> tuple[dict, str]:
    """The computations and the decode loop's body: the while body with the most
    collectives among those the entry computation runs."""
    comps = computations(hlo)
    bodies = [w.group(1) for lines in comps.values() for x in lines if (w := WHILE.search(x))]
    return comps, max(bodies, key=lambda b: collectives(comps, b)[0])


def worker(n: int, shape: str) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    from rlhf_jax.config import MeshConfig
    from rlhf_jax.models import init_params
    from rlhf_jax.models.hf import read_hf_config
    from rlhf_jax.rollout import generate
    from rlhf_jax.sharding import (
        activation_rules,
        batch_sharding,
        make_mesh,
        model_param_shardings,
        replicated,
        with_activation_sharding,
    )

    cfg = read_hf_config(shape).replace(param_dtype="bfloat16", dtype="bfloat16")
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    rows, prompt, new = n, 64, 4

    def sample(params, ids, mask, key):
        return generate(cfg, params, ids, mask, key, new, eos_id=(cfg.eos_token_id,), pad_id=0)

    def layout(name):
        data, fsdp, tensor = LAYOUTS[name](n)
        mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
        mesh = make_mesh(mesh_cfg)
        return mesh, mesh_cfg.rules, model_param_shardings(cfg, mesh, mesh_cfg.rules)

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)  # fmt: skip

    out = {}
    _, _, fsdp_sh = layout("fsdp")
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    for name in LAYOUTS:
        mesh, rules, p_sh = layout(name)
        rows_sh, rep = batch_sharding(mesh, rules, 1), replicated(mesh)
        fn = with_activation_sharding(sample, mesh, activation_rules(rules))
        jitted = jax.jit(fn, in_shardings=(p_sh, rows_sh, rows_sh, rep))
        ids = jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=rows_sh)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
        compiled = jitted.lower(abstract(shapes, p_sh), ids, ids, key).compile()
        hlo = compiled.as_text()
        comps, body = decode_body(hlo)
        count, size = collectives(comps, body)
        once = collectives(*_entry(hlo), loops=False)  # per call: prefill, hoisted gathers
        mem = compiled.memory_analysis()
        # the reshard a rollout in this layout would need first: FSDP -> this layout
        moved = jax.jit(lambda p: p, out_shardings=p_sh).lower(abstract(shapes, fsdp_sh))
        r_count, r_size = collectives(*_entry(moved.compile().as_text()))
        weights = sum(
            math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(p_sh))
        )
        out[name] = {
            "mesh": LAYOUTS[name](n),
            "collectives_per_token": count,
            "bytes_per_token": size,
            "outside_loop_collectives": once[0],
            "outside_loop_bytes": once[1],
            "reshard_collectives": r_count,
            "reshard_bytes": r_size,
            "weights_per_device": weights,
            "temp_bytes": mem.temp_size_in_bytes,
        }
    out["_"] = {"param_bytes": param_bytes, "layers": cfg.n_layers, "rows": rows}
    return out


def _entry(hlo: str) -> tuple[dict, str]:
    comps = computations(hlo)
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    return comps, re.match(r"ENTRY %?([\w.\-]+)", entry).group(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--shape", default="configs/shapes/llama-3.2-1b")
    args = p.parse_args()
    print(json.dumps(worker(args.devices, args.shape), indent=1))


if __name__ == "__main__":
    sys.exit(main())
