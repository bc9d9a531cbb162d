"""How the SFT step grows: time and peak memory against sequence length, batch and model size
(one device), and memory per device against the number of FSDP devices (simulated CPU devices).

The step is the library's own: `make_sft_step` with the registered default SFT loss and the
AdamW optimizer of `make_optimizer`, jitted with the state donated. Peak memory is the compiled
executable's own account (`memory_analysis()`): arguments + outputs + temporaries, with the
donated (aliased) state counted once.

The FSDP table runs one subprocess per device count, because the number of simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) is fixed when JAX starts. It needs no
run: per-device parameter and optimizer bytes follow from each array's sharding, and the
temporaries from compiling the sharded step (`rlhf_jax.sharding.jit_step`) for that mesh.

    python -m bench.scaling [--size tiny|full] [--out PATH|-]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

from bench.common import REPO, Table, parser, publish, time_one
from bench.flops import train_flops
from bench.models import GPT2_6L, GPT2_12L, TINY, TINY_LLAMA, Shape

WORKER_FLAG = "--fsdp-worker"

TIME_COLUMNS = (
    "model",
    "batch",
    "seq len",
    "tokens/step",
    "step ms",
    "tokens/s",
    "model GFLOP/s",
    "peak memory MiB",
    "temp MiB",
)
FSDP_COLUMNS = (
    "model",
    "devices",
    "params MiB/device",
    "optimizer MiB/device",
    "compiled temp MiB/device",
    "total MiB/device",
    "total x devices / 1-device total",
)
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Plan:
    # (shape, batch, seq_len) points of the one-device table
    points: tuple[tuple[Shape, int, int], ...]
    fsdp_shapes: tuple[Shape, ...]
    fsdp_batch: int
    fsdp_seq: int
    devices: tuple[int, ...]


# One factor at a time around (6L/512d, batch 4, length 128): length, then batch, then size.
FULL = Plan(
    points=(
        (GPT2_6L, 4, 128),
        (GPT2_6L, 4, 256),
        (GPT2_6L, 4, 512),
        (GPT2_6L, 8, 128),
        (GPT2_6L, 16, 128),
        (GPT2_12L, 4, 128),
    ),
    fsdp_shapes=(GPT2_6L, GPT2_12L),
    fsdp_batch=8,
    fsdp_seq=128,
    devices=(1, 2, 4, 8),
)
TINY_PLAN = Plan(
    points=((TINY, 2, 16), (TINY_LLAMA, 2, 16)),
    fsdp_shapes=(TINY,),
    fsdp_batch=8,
    fsdp_seq=16,
    devices=(1, 2),
)


def model_config(shape: Shape):
    """The ModelConfig of `shape`, read from the config.json that `bench.models.hf_config`
    writes (built here without importing transformers, which the workers do not need)."""
    from rlhf_jax.models.hf.config_map import from_hf_config

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": shape.vocab}
    if shape.family == "gpt2":
        d = {
            "model_type": "gpt2",
            "n_embd": shape.d_model,
            "n_layer": shape.n_layers,
            "n_head": shape.n_heads,
            "n_positions": shape.max_positions,
        }
    else:
        d = {
            "model_type": "llama",
            "hidden_size": shape.d_model,
            "num_hidden_layers": shape.n_layers,
            "num_attention_heads": shape.n_heads,
            "num_key_value_heads": shape.n_kv_heads,
            "intermediate_size": shape.mlp_dim,
            "max_position_embeddings": shape.max_positions,
            "tie_word_embeddings": False,
        }
    return from_hf_config({**d, **ids})


def sft_parts(shape: Shape):
    """(ModelConfig, step function, optimizer) of the library's SFT step."""
    from rlhf_jax.config import OptimConfig
    from rlhf_jax.losses import get_loss
    from rlhf_jax.steps import make_optimizer, make_sft_step

    config = model_config(shape)
    step = make_sft_step(config, get_loss("sft", "default"))
    return config, step, make_optimizer(OptimConfig(), total_steps=1000)


def host_batch(shape: Shape, batch: int, seq: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, shape.vocab, size=(batch, seq)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


def peak_bytes(compiled) -> tuple[int, int]:
    """(arguments + outputs - aliased + temporaries, temporaries) of a compiled executable."""
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return peak, m.temp_size_in_bytes


def time_table(plan: Plan, warmup: int, repeats: int) -> Table:
    import jax

    from rlhf_jax.models import init_params
    from rlhf_jax.steps import TrainState

    table = Table("SFT step: time and peak memory (one device)", TIME_COLUMNS)
    table.notes += [
        f"Median of {repeats} steps after {warmup} discarded (and the compiling call). "
        "Model GFLOP/s counts 3 x forward FLOPs (`bench.flops.train_flops`). Peak memory: "
        "the compiled step's `memory_analysis()`, arguments + outputs + temporaries with the "
        "donated state counted once; temp: the temporaries alone (activations kept for the "
        "backward pass, gradients, logits).",
    ]
    for shape, batch, seq in plan.points:
        config, step, tx = sft_parts(shape)
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
        state = TrainState.create(params, tx)
        data = jax.device_put(host_batch(shape, batch, seq))
        key = jax.random.key(1)
        compiled = jax.jit(step, donate_argnums=0).lower(state, data, key).compile()
        peak, temp = peak_bytes(compiled)
        box = [state]

        def run(box=box, compiled=compiled, data=data, key=key):
            box[0], metrics = compiled(box[0], data, key)
            jax.block_until_ready((box[0], metrics))

        t = time_one(run, warmup, repeats)
        tokens = batch * seq
        table.add(
            shape.name,
            batch,
            seq,
            tokens,
            t.median * 1e3,
            tokens / t.median,
            train_flops(shape, batch, seq) / t.median / 1e9,
            peak / MIB,
            temp / MIB,
        )
        print(f"done: {shape.name} batch {batch} seq {seq}", file=sys.stderr, flush=True)
    return table


def fsdp_worker(argv: list[str]) -> None:
    """In a fresh process: `--fsdp-worker N SIZE` prints one JSON line per FSDP shape."""
    n, size = int(argv[0]), argv[1]
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    from rlhf_jax.config import MeshConfig
    from rlhf_jax.models import param_shapes
    from rlhf_jax.sharding import (
        batch_sharding,
        jit_step,
        make_mesh,
        model_param_shardings,
        state_shardings,
    )
    from rlhf_jax.steps import TrainState

    assert jax.device_count() == n, (jax.device_count(), n)
    plan = TINY_PLAN if size == "tiny" else FULL
    mesh_cfg = MeshConfig(data=1, fsdp=n, tensor=1)
    mesh = make_mesh(mesh_cfg)
    for shape in plan.fsdp_shapes:
        config, step, tx = sft_parts(shape)
        p_sh = model_param_shardings(config, mesh, mesh_cfg.rules)
        shapes = param_shapes(config)
        abstract = jax.eval_shape(lambda p, tx=tx: TrainState.create(p, tx), shapes)
        st_sh = state_shardings(abstract, mesh, (shapes, p_sh))
        rows = batch_sharding(mesh, mesh_cfg.rules, 1)

        def per_device(tree, shardings):
            leaves = jax.tree.leaves(tree)
            shs = jax.tree.leaves(shardings)
            return sum(
                math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                for x, sh in zip(leaves, shs)
            )

        batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows)
            for k, v in host_batch(shape, plan.fsdp_batch, plan.fsdp_seq).items()
        }
        state_in = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, st_sh
        )
        jitted = jit_step(step, st_sh, rows)
        compiled = jitted.lower(state_in, batch, jax.random.key(0)).compile()
        _, temp = peak_bytes(compiled)
        record = {
            "model": shape.name,
            "devices": n,
            "params": per_device(abstract.params, st_sh.params),
            "opt": per_device(abstract.opt_state, st_sh.opt_state),
            "temp": temp,
        }
        print("FSDP " + json.dumps(record), flush=True)


def fsdp_table(plan: Plan, size: str) -> Table:
    # The workers only compile (nothing is timed), so they run side by side.
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    procs = {
        n: subprocess.Popen(
            [sys.executable, "-m", "bench.scaling", WORKER_FLAG, str(n), size],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in plan.devices
    }
    records = []
    for n, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"FSDP worker with {n} devices failed:\n{err[-4000:]}")
        records += [json.loads(line[5:]) for line in out.splitlines() if line.startswith("FSDP ")]
        print(f"done: fsdp {n} devices", file=sys.stderr, flush=True)
    table = Table(
        f"SFT step under FSDP: memory per device (batch {plan.fsdp_batch}, length "
        f"{plan.fsdp_seq}, simulated CPU devices)",
        FSDP_COLUMNS,
    )
    table.notes += [
        "Mesh data=1 x fsdp=N x tensor=1 with the default logical-axis rules (weights' `embed` "
        "dimension and the batch split over `fsdp`). Params and optimizer: bytes of each "
        "array's shard on one device, from its sharding (Adam's two moments follow their "
        "parameter; counters replicated). Compiled temp: temporaries of the sharded step "
        "compiled for that mesh (per device: activations of its rows, the all-gathered "
        "weights, gradients). The last column is 1.0 when memory is perfectly split and "
        "grows with what each device duplicates. Nothing is timed: simulated devices share "
        "the same cores.",
    ]
    base = {}
    for r in records:
        total = r["params"] + r["opt"] + r["temp"]
        if r["devices"] == 1:
            base[r["model"]] = total
        ratio = total * r["devices"] / base[r["model"]] if r["model"] in base else float("nan")
        table.add(
            r["model"],
            r["devices"],
            r["params"] / MIB,
            r["opt"] / MIB,
            r["temp"] / MIB,
            total / MIB,
            ratio,
        )
    return table


def main(argv: list[str] | None = None) -> str | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == WORKER_FLAG:
        fsdp_worker(argv[1:])
        return None
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.size == "tiny":
        plan, warmup, repeats = TINY_PLAN, 0, min(args.repeats, 1)
    else:
        plan, warmup, repeats = FULL, min(args.warmup, 1), min(args.repeats, 3)
    tables = [time_table(plan, warmup, max(repeats, 1)), fsdp_table(plan, args.size)]
    return publish("scaling", tables, args.out)


if __name__ == "__main__":
    main()
