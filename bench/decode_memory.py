"""The sampler's compiled temporaries at a real width and a cut depth, with and without the
layer scan (`generate(layer_scan=True)`, `ppo.decode_layer_scan`), issue 23.

Compiled, never run: `rollout.generate` as the RL sampler calls it (record_support, one EOS
id), abstract weights of a shape folder's width (default Llama-3.1-8B, bf16) with
`--layers` of its layers, LoRA rank-16 adapters on every projection with `--lora`. On
XLA:CPU bf16 programs are compiled with the plan's accelerator correction
(`plan/correction.py`). What grows per layer is the slope between two depths:

    python -m bench.decode_memory --layers 2 4 [--layer-scan] [--lora]

`--dump DIR` also writes XLA's buffer assignment (`XLA_FLAGS=--xla_dump_to=DIR`) for
reading which buffers are live at the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

GIB = 2**30
TARGETS = ("q", "k", "v", "o", "up", "gate", "down")


def temporaries(args, layers: int) -> dict:
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.hf.io import read_hf_config
    from rlhf_jax.models.lora import with_lora
    from rlhf_jax.models.transformer import param_shapes
    from rlhf_jax.plan.correction import compile_corrected
    from rlhf_jax.rollout import generate

    cfg = read_hf_config(args.shape).replace(
        n_layers=layers, dtype=args.dtype, param_dtype=args.dtype
    )
    if args.lora:
        cfg = with_lora(cfg, 16, 32.0, TARGETS)
    shapes = param_shapes(cfg)

    def sample(params, ids, mask, key):
        out = generate(
            cfg, params, ids, mask, key, args.new, eos_id=cfg.eos_ids or (0,),
            record_support=True, layer_scan=args.layer_scan,
        )  # fmt: skip
        return out.tokens, out.logprobs

    ids = jax.ShapeDtypeStruct((args.rows, args.prompt), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    lowered = jax.jit(sample).lower(shapes, ids, ids, key)
    compiled = compile_corrected(lowered) or lowered.compile()
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["layers"]))
    return {
        "layers": layers,
        "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GIB,
        "layer_weights_gib": layer_bytes / layers / GIB,
        "compile_s": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="configs/shapes/llama-3.1-8b")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--layer-scan", action="store_true")
    ap.add_argument("--dump", default=None)
    args = ap.parse_args(argv)
    if args.dump:  # before jax starts
        flags = f"--xla_dump_to={args.dump} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}"
    rows = [temporaries(args, n) for n in args.layers]
    for row in rows:
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["temp_gib"] - a["temp_gib"]) / (b["layers"] - a["layers"])
        print(f"temporaries per layer: {slope:.3f} GiB", file=sys.stderr)


if __name__ == "__main__":
    main()
