"""The plan's accelerator correction: XLA:CPU's float32 copies of bf16 weights taken out.

XLA:CPU has no bf16 matmul: before it compiles a program it rewrites every bf16 dot into a
float32 one (`convert` of each operand, then of the result). Inside a loop -- the decode
loop, the scan over layers -- the `convert` of a weight is loop-invariant, so XLA's
while-loop-invariant code motion hoists it: the whole stacked weight is converted once,
before the loop, and its float32 copy (twice the weight's bytes) lives through the loop. A
GPU or TPU compiler multiplies bf16 natively: it has no such `convert` to hoist. The
corrected figure is the same program compiled with that one pass off
(`xla_disable_hlo_passes=while-loop-invariant-code-motion`): the copies are then made per
use inside the loop, one layer's worth at a time, and freed.

Why this is sound rather than just smaller: in programs without bf16 (no such converts),
switching the pass off changes the temporaries by well under 1% (tests/loops/test_plan.py
checks it), so the pass hoists nothing else of size in these programs; what it removes in a
bf16 program is the hoisted copies. The per-use copies that remain (one layer's weights in
float32, XLA:CPU's float32 elementwise work) are still counted, so the figure stays on the
high side of an accelerator's. The corrected executable is a real program: `python -m
rlhf_jax.plan.measure` runs it and measures its peak on CPU (docs/memory.md).
"""

from __future__ import annotations

import jax

# One XLA pass off, per compile (jax's `compiler_options`: no process-wide flag).
NO_HOIST = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def applies(lowered) -> bool:
    """Whether the correction applies: XLA:CPU compiles (the accelerators' compilers make
    no such copies) a program with bf16 values in it."""
    return jax.default_backend() == "cpu" and "bf16" in lowered.as_text()


def compile_corrected(lowered):
    """The program compiled without hoisting (XLA:CPU), or None when the correction does not
    apply to it."""
    if not applies(lowered):
        return None
    return lowered.compile(compiler_options=NO_HOIST)
