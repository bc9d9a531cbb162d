"""Compile SFT, RM, DPO, RL experience and RL update for one device count on an FSDP mesh, at
a fixed number of rows per device; print per program the per-device peak, the largest
floating-point collective and every collective that moves a global-batch activation. The
evaluation programs (`eval_programs.py`) likewise, without the peak.

Run as `python scaling_script.py REPO N [unconstrained]`: the device count must be set before
JAX starts. `unconstrained` compiles the SFT step and the held-out LM loss alone with the
activation constraints switched off: the control that shows the check sees the gather the
constraints remove.
"""

import math
import os
import re
import sys

sys.path.insert(0, sys.argv[1])
N = int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from rlhf_jax.config import Config, load_config  # noqa: E402
from rlhf_jax.loops.runtime import Runtime  # noqa: E402
from rlhf_jax.plan.abstract import abstract_stage  # noqa: E402
from rlhf_jax.plan.planner import builders, compile_program, plan_program, totals  # noqa: E402
from rlhf_jax.sharding import jit as sharding_jit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_programs import eval_programs  # noqa: E402
from result_line import emit  # noqa: E402

UNCONSTRAINED = sys.argv[3:] == ["unconstrained"]
if UNCONSTRAINED:  # the jit wrappers look this name up at each call
    sharding_jit.with_activation_sharding = lambda fn, mesh, rules: fn

# 3 rows per device: global row counts (3N, and 6N for 2-way rankings) differ from every
# weight dimension (64, 128, 1000, 16, 4, 2), so a collective whose leading dimension is one
# of them is batch data, not a weight.
ROWS = 3
MAX_LEN = 48  # the longest sequence of any program below (sft.max_len)
OVERRIDES = [
    "model.d_model=64",
    "model.n_layers=1",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_dim=128",
    "task.vocab_size=1000",  # [global tokens, vocab] logits dwarf every weight
    "pretrain.steps=0",
    f"sft.batch_size={ROWS * N}",
    f"sft.max_len={MAX_LEN}",
    f"rm.batch_size={ROWS * N}",
    "rm.k=2",
    f"ppo.rollout_batch={ROWS * N}",
    f"ppo.minibatch_size={ROWS * N}",
    "ppo.epochs=1",
    "ppo.max_new_tokens=4",
    "ptx.coef=0",
    "dpo.steps=1",
    f"dpo.batch_size={ROWS * N}",
    "compare.preference={dpo: {}}",
    "mesh.data=1",
    "mesh.fsdp=-1",
]
COLLECTIVE = re.compile(
    r"= (\([^=]*?\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
ARRAY = re.compile(r"(f16|bf16|f32|f64)\[([0-9,]*)\]")


def global_rows(program) -> tuple[set[int], set[int]]:
    """The program's global row counts (the leading dimension of its batch-like arguments,
    and rows x K of K-wise rankings, which the steps flatten) and its sequence lengths."""
    rows, lengths = set(), set()
    for arg, role in zip(program.args, program.roles):
        if role in ("state", "frozen", "policy_weights", "key"):
            continue
        for leaf in jax.tree.leaves(arg):
            if leaf.ndim >= 2:
                rows.add(leaf.shape[0])
                lengths.add(leaf.shape[-1])
            if leaf.ndim == 3:
                rows.add(leaf.shape[0] * leaf.shape[1])
    return rows, lengths


def batch_collectives(hlo: str, rows: set[int], lengths: set[int]) -> tuple[list[str], int]:
    """(floating collectives that move a [global rows, ...] or [global tokens, ...] array
    with more than one value per token, the largest floating collective in elements). A
    [global rows, tokens] array of per-token scalars (advantages, log-probs) is allowed."""
    found, largest = [], 0
    tokens = {r * t for r in rows for t in lengths | {MAX_LEN} if t > 1}
    for m in COLLECTIVE.finditer(hlo):
        for dtype, dims in ARRAY.findall(m.group(1)):
            shape = [int(d) for d in dims.split(",") if d and int(d) > 1]
            size = math.prod(shape)
            largest = max(largest, size)
            if not shape:
                continue
            per_row = math.prod(shape[1:])
            if (shape[0] in rows and per_row > MAX_LEN) or (shape[0] in tokens and per_row > 1):
                found.append(f"{m.group(2)} {dtype}{shape}")
    return found, largest


def main() -> None:
    cfg = load_config(Config, os.path.join(sys.argv[1], "configs/quickstart.yaml"), OVERRIDES)
    runtime = Runtime.from_config(cfg)
    out = {}
    for stage, build_fn in builders(cfg, runtime).items():
        if UNCONSTRAINED and stage != "sft":
            continue
        build = build_fn()
        abstract_stage(build, runtime)
        for program in build.program_list:
            compiled = compile_program(program)
            plan = plan_program(program, totals(build.detail), compiled)
            moved, largest = batch_collectives(compiled.raw.as_text(), *global_rows(program))
            out[f"{stage}/{program.name}"] = {
                "peak": plan.peak,
                "largest_collective": largest,
                "batch_collectives": moved,
            }
    for name, (jitted, args, rows, lengths) in eval_programs(cfg, runtime, ROWS * N).items():
        if UNCONSTRAINED and name != "eval/lm_loss":
            continue
        hlo = jitted.lower(*args).compile().as_text()
        moved, largest = batch_collectives(hlo, rows, lengths)
        out[name] = {"largest_collective": largest, "batch_collectives": moved}
    emit(out)


if __name__ == "__main__":
    main()
