"""`rlhf-jax plan`: the command's arguments and what it prints. Importing this module loads no
JAX (the CLI builds its parser from it before any command runs)."""

from __future__ import annotations

import argparse
import json
import sys

from rlhf_jax.config.schema import AT_LEAST_1
from rlhf_jax.flags import add_number


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="per-device memory of every stage of a config, before launching it",
        description="Compile every stage's programs on abstract inputs (no weights are "
        "loaded or allocated) and print, per device on the configured mesh, the bytes of "
        "weights, optimizer state, frozen models, KV cache and activations against the "
        "device's memory, with the switches that would make a stage fit (docs/memory.md).",
    )
    p.add_argument("--config", help="YAML config file (see configs/); defaults when omitted")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.remat=true"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory per device with its unit, e.g. 80GB or 80GiB (default: detected; on CPU, "
        "the host's RAM)",
    )
    add_number(
        p,
        "--devices",
        int,
        AT_LEAST_1,
        metavar="N",
        help="plan for N devices (virtual CPU devices: no accelerator needed)",
    )
    add_number(
        p,
        "--per-device-batch",
        int,
        AT_LEAST_1,
        metavar="B",
        help="rescale every stage's batch so that each device holds B rows per micro-batch "
        "(grad_accum, samples per prompt and minibatches per epoch kept): plans for "
        "different --devices then compare the same per-device work (docs/memory.md)",
    )
    p.set_defaults(run=run_plan)


def _progress(line: str) -> None:
    print(f"plan: {line}", file=sys.stderr, flush=True)


def _per_device(cfg, args: argparse.Namespace):
    """The config again, with `--per-device-batch`'s batch sizes over the user's overrides."""
    from rlhf_jax.config import Config, load_config
    from rlhf_jax.loops.runtime import Runtime
    from rlhf_jax.plan.per_device import batch_ways, per_device_overrides

    ways = batch_ways(cfg, dict(Runtime.from_config(cfg).mesh.shape))
    extra = per_device_overrides(cfg, args.per_device_batch, ways)
    _progress(f"--per-device-batch {args.per_device_batch} over {ways} devices: {' '.join(extra)}")
    return load_config(Config, args.config, [*args.overrides, *extra])


def run_plan(args: argparse.Namespace) -> int:
    from rlhf_jax.plan.devices import device_memory, parse_bytes, use_virtual_devices

    if args.devices is not None:  # first: the CPU backend reads it when it starts
        use_virtual_devices(args.devices)
    given = parse_bytes(args.device_memory) if args.device_memory is not None else None

    import jax

    from rlhf_jax.config import Config, load_config
    from rlhf_jax.loops.checks import language_models, require_language_model
    from rlhf_jax.loops.runtime import Runtime
    from rlhf_jax.plan.advice import Context
    from rlhf_jax.plan.planner import plan_stages
    from rlhf_jax.plan.report import fmt_bytes, plan_json, render_table

    cfg = load_config(Config, args.config, args.overrides)
    if args.per_device_batch is not None:
        cfg = _per_device(cfg, args)
    for key, path in language_models(cfg).items():  # the check `sft`, `rm`, ... make
        require_language_model(path, key)
    runtime = Runtime.from_config(cfg)
    memory, source = device_memory(given)
    stages = plan_stages(cfg, runtime, _progress)
    ctx = Context(cfg, runtime, memory)
    if args.json:
        print(json.dumps(plan_json(stages, ctx), indent=2))
        return 0
    mesh = " x ".join(f"{axis}={size}" for axis, size in runtime.mesh.shape.items())
    header = (
        f"Memory plan per device: {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {mesh}; {fmt_bytes(memory)} per device ({source})"
    )
    print(render_table(stages, ctx, header))
    return 0
