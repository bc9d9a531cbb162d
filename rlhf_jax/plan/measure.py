"""The check on a plan: run one iteration of a stage on real (random) weights and batches and
measure its peak memory, to compare with what the plan predicted (docs/memory.md).

    python -m rlhf_jax.plan.measure [--config FILE] STAGE [key=value ...]

prints one JSON object: the planned and the measured peak in bytes, their ratio, the method.
The stage is built exactly as the plan builds it (the loops' `stage_weights`, state
constructors and `init_sharded_state`), random weights standing in for loaded ones, and its
programs run as the loop runs them (RL: experience, then the update on that experience), from
the very executables the plan compiled.

What is measured: on a GPU/TPU, the allocator's peak (`memory_stats()["peak_bytes_in_use"]`)
above what was in use before the weights were made. On CPU, the process's peak resident
memory (VmHWM) above its resident memory just before the weights were made: everything is
compiled and run once first, then freed, and the high-water mark reset (`/proc/self/clear_refs`)
so that neither the compiler's memory nor one-time runtime set-up counts; buffers are mmapped
(glibc's mmap threshold fixed low) so that freed memory really leaves the process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from typing import Any

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


class _Rss:
    """Peak resident memory above a baseline, on Linux."""

    method = "process peak RSS (VmHWM) above the baseline"

    def start(self) -> None:
        gc.collect()
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.base = _status_bytes("VmRSS")

    def peak(self) -> int:
        return _status_bytes("VmHWM") - self.base


class _Allocator:
    """The device allocator's peak above what was in use at the baseline."""

    method = "device allocator peak_bytes_in_use above the baseline"

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        self.base = self.device.memory_stats()["bytes_in_use"]

    def peak(self) -> int:
        return self.device.memory_stats()["peak_bytes_in_use"] - self.base


def _materialize(tree: Any, vocab: int, rng) -> Any:
    """Real arrays for abstract batch leaves: token ids below `vocab`, ones elsewhere (every
    mask on, every completion starting at position 1)."""
    import jax
    import numpy as np

    def one(x):
        if x.dtype == np.int32 and x.ndim >= 2:
            value = rng.integers(0, vocab, x.shape).astype(np.int32)
        else:
            value = np.ones(x.shape, x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(one, tree)


def _constructor(build, runtime):
    """`construct()`: the stage's weights as its loop holds them: starting weights (random
    here), then the loop's own assembly and `init_sharded_state`, the frozen weights placed.
    The jitted initialisers are made once, so a second call compiles nothing."""
    import jax

    from rlhf_jax.plan import abstract as ab
    from rlhf_jax.sharding import init_sharded_state

    inits = {}
    for name, start in build.starts.items():
        shapes = ab.model_params(start.config, runtime, start.scalar)[0]
        shardings = jax.tree.map(lambda x: x.sharding, shapes)
        inits[name] = jax.jit(start.init, out_shardings=shardings)

    def construct():
        key = jax.random.key(0)
        starts = {name: init(key) for name, init in inits.items()}
        a = build.assemble(starts, key)
        state, _ = init_sharded_state(a.create, a.inputs, a.input_shardings, runtime.mesh)
        return starts, state, a.frozen, a  # (RL's frozen weights: placed by `assemble`)

    return construct


def _run_iteration(build, compiled: dict, held: tuple, batches: dict) -> Any:
    """One step / RL iteration: every program in order, arguments by role."""
    import jax

    from rlhf_jax.steps import policy_with

    starts, state, frozen, a = held
    outputs: dict[str, Any] = {}
    experience = None
    for program in build.program_list:
        args = []
        for i, role in enumerate(program.roles):
            if role == "state":
                args.append(state)
            elif role == "frozen":
                args.append(frozen)
            elif role == "policy_weights":
                args.append(policy_with(a.info["policy"], state.policy.params, frozen))
            elif role == "rollout":
                args.append(outputs["sample"])
            elif role == "experience":
                args.append(experience)
            else:  # batch, key, scores
                args.append(batches[(program.name, i)])
        out = compiled[program.name](*args)
        jax.block_until_ready(out)
        outputs[program.name] = out
        if program.name in ("experience", "finish"):
            experience = out[0]
        if program.training:  # the old state was donated
            state = out[0]
    return starts, state, frozen, a


def measure(cfg, stage: str, corrected: bool = True) -> dict:
    """Plan `stage` of `cfg`, then run it for real and measure; returns the comparison. The
    programs run are those the plan's accelerator-corrected figure comes from, or with
    `corrected=False` XLA:CPU's own, compared with XLA:CPU's own figure."""
    import jax
    import numpy as np

    from rlhf_jax.loops.runtime import Runtime
    from rlhf_jax.plan import abstract as ab
    from rlhf_jax.plan.planner import builders, compile_program, plan_program, totals

    runtime = Runtime.from_config(cfg)
    build = builders(cfg, runtime)[stage]()
    ab.abstract_stage(build, runtime)
    if any(p.name == "merge" for p in build.program_list):
        from rlhf_jax.errors import RlhfJaxError

        raise RlhfJaxError(
            "config key 'ppo.rollout_filters': the measured check runs one unfiltered RL "
            "iteration; measure with ppo.rollout_filters=[]"
        )
    resident = totals(build.detail)
    compiled, planned = {}, {}
    for program in build.program_list:
        both = compile_program(program)  # run: the executable the plan's figure comes from
        compiled[program.name] = both.corrected if corrected else both.raw
        planned[program.name] = plan_program(program, resident, both)
    vocab = next(iter(build.starts.values())).config.vocab_size
    rng = np.random.default_rng(0)
    batches = {}  # made before the baseline: the loop's batches are host data too
    for p in build.program_list:
        for i, (arg, role) in enumerate(zip(p.args, p.roles)):
            if role == "key":
                batches[(p.name, i)] = jax.random.key(0)
            elif role in ("batch", "scores"):
                batches[(p.name, i)] = _materialize(arg, vocab, rng)
    device = jax.local_devices()[0]
    meter = _Allocator(device) if (device.memory_stats() or {}).get("peak_bytes_in_use") else None
    construct = _constructor(build, runtime)
    if meter is None:  # CPU: compile and run everything once, free it, then measure
        held = _run_iteration(build, compiled, construct(), batches)
        del held
        meter = _Rss()
    meter.start()
    held = _run_iteration(build, compiled, construct(), batches)
    measured = meter.peak()
    del held
    peak = max(p.peak + (0 if corrected else p.cpu_copies) for p in planned.values())
    return {
        "stage": stage,
        "planned_bytes": peak,
        "measured_bytes": measured,
        "ratio": peak / measured if measured > 0 else None,
        "method": meter.method,
        "corrected": corrected,
        "xla_cpu_copies": {n: p.cpu_copies for n, p in planned.items()},
        "devices": jax.device_count(),
        "programs": {n: {"peak": p.peak, "parts": p.parts} for n, p in planned.items()},
    }


def measure_in_subprocess(
    config: str | None,
    stage: str,
    overrides: list[str],
    timeout: float = 600,
    corrected: bool = True,
) -> dict:
    """`measure` in a fresh Python process (a clean baseline), its JSON result."""
    flag = [] if corrected else ["--uncorrected"]
    cmd = [sys.executable, "-m", "rlhf_jax.plan.measure", *flag, stage, *overrides]
    if config is not None:
        cmd[3:3] = ["--config", config]  # after "-m rlhf_jax.plan.measure"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    libc = _libc()
    if libc is not None:  # big buffers in their own mappings: freed memory leaves the process
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    p = argparse.ArgumentParser(prog="python -m rlhf_jax.plan.measure", description=__doc__)
    p.add_argument("--config")
    p.add_argument(
        "--uncorrected",
        action="store_true",
        help="run XLA:CPU's own executables (with its float32 copies of bf16 weights) and "
        "compare with XLA:CPU's figure instead of the accelerator-corrected one",
    )
    p.add_argument("stage")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import tempfile

    import jax

    from rlhf_jax.config import Config, load_config

    # Functions the loops jit afresh on every call (LoRA's adapter initialiser) compile again
    # in the measured run: from a compilation cache, not through LLVM, whose heap would stay
    # in the process's resident memory and count as if it were the stage's.
    cache = tempfile.mkdtemp(prefix="rlhf-jax-measure-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    from rlhf_jax.errors import RlhfJaxError

    try:
        cfg = load_config(Config, args.config, args.overrides)
        result = measure(cfg, args.stage, corrected=not args.uncorrected)
    except RlhfJaxError as e:  # a bad config or a stage it cannot measure: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
