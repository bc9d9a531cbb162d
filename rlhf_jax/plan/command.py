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
    p.add_argument(
        "--check",
        action="store_true",
        help="for a stage that does not fit, plan it again with each switch the plan names "
        "(each that fits alone, else the ones named together) and print the compiled peak "
        "beside the estimate: one more compile of that stage per switch",
    )
    p.set_defaults(run=run_plan)


def _progress(line: str) -> None:
    print(f"plan: {line}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace, switches: tuple[str, ...] = ()):
    """The config of the user's file and overrides (then `switches`), and with
    `--per-device-batch` its batch sizes over them."""
    from rlhf_jax.config import Config, load_config
    from rlhf_jax.loops.runtime import Runtime
    from rlhf_jax.plan.per_device import batch_ways, per_device_overrides

    overrides = [*args.overrides, *switches]
    cfg = load_config(Config, args.config, overrides)
    if args.per_device_batch is None:
        return cfg
    ways = batch_ways(cfg, dict(Runtime.from_config(cfg).mesh.shape))
    extra = per_device_overrides(cfg, args.per_device_batch, ways)
    _progress(f"--per-device-batch {args.per_device_batch} over {ways} devices: {' '.join(extra)}")
    return load_config(Config, args.config, [*overrides, *extra])


def _replan(args: argparse.Namespace):
    """(stage name, switches) -> that stage planned alone with the switches applied."""
    from rlhf_jax.errors import RlhfJaxError
    from rlhf_jax.loops.runtime import Runtime
    from rlhf_jax.plan.planner import plan_stages

    def replan(name: str, switches: list[str]):
        cfg = _load(args, tuple(switches))
        show = f"--check {' '.join(switches)}: "
        plans = plan_stages(cfg, Runtime.from_config(cfg), lambda s: _progress(show + s), name)
        if not plans:
            raise RlhfJaxError(f"with {' '.join(switches)} the config runs no '{name}' stage")
        return plans[0]

    return replan


def run_plan(args: argparse.Namespace) -> int:
    from rlhf_jax.plan.devices import device_memory, parse_bytes, use_virtual_devices

    if args.devices is not None:  # first: the CPU backend reads it when it starts
        use_virtual_devices(args.devices)
    given = parse_bytes(args.device_memory) if args.device_memory is not None else None

    import jax

    from rlhf_jax.loops.checks import language_models, require_language_model
    from rlhf_jax.loops.runtime import Runtime
    from rlhf_jax.plan.advice import Context
    from rlhf_jax.plan.check import check_switches
    from rlhf_jax.plan.planner import plan_stages
    from rlhf_jax.plan.report import fmt_bytes, plan_json, render_table

    cfg = _load(args)
    for key, path in language_models(cfg).items():  # the check `sft`, `rm`, ... make
        require_language_model(path, key)
    runtime = Runtime.from_config(cfg)
    memory, source = device_memory(given)
    stages = plan_stages(cfg, runtime, _progress)
    ctx = Context(cfg, runtime, memory)
    checks = check_switches(stages, ctx, _replan(args)) if args.check else None
    if args.json:
        print(json.dumps(plan_json(stages, ctx, checks), indent=2))
        return 0
    mesh = " x ".join(f"{axis}={size}" for axis, size in runtime.mesh.shape.items())
    header = (
        f"Memory plan per device: {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"mesh {mesh}; {fmt_bytes(memory)} per device ({source})"
    )
    print(render_table(stages, ctx, header, checks))
    return 0
