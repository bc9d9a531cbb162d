"""Rows 3-5 of the accelerator check: the SFT step's MFU in bf16, one PPO and one GRPO
iteration, and the peak device memory of the SFT step and the PPO update against XLA's
prediction.

Each section (`run_sft`, `run_rl`) is its own process and measures its peak before anything
else runs in it: JAX's allocator keeps one peak per process and cannot reset it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench import rl_iteration
from bench.accelerator_common import (
    Lazy,
    Recorder,
    Sizes,
    bf16_peak,
    ensure_checkpoint,
    measured_peak_bytes,
    memory_cells,
    on_cpu,
    predicted_peak_bytes,
    repeated_bytes,
    unique_bytes,
)
from bench.common import fmt, time_one
from bench.flops import train_flops
from bench.trl_setup import random_ids

# ----------------------------------------------------------------------------- SFT


def sft_step(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """The project's SFT step (`make_sft_step` with the registered loss, AdamW from
    `make_optimizer`, state donated) on fp32 weights with bf16 compute, compiled once through
    the loop's own `CompiledOnce`; timed, then the process's peak read."""
    import jax
    import jax.numpy as jnp

    from bench.training import _jax_runner, _optimizer
    from rlhf_jax.loops.train import CompiledOnce
    from rlhf_jax.losses import get_loss
    from rlhf_jax.models import load_hf
    from rlhf_jax.steps import TrainState, make_sft_step

    folder, _ = ensure_checkpoint(sizes.big, workdir)
    config, params = load_hf(folder, dtype="float32", compute_dtype="bfloat16")
    state = TrainState.create(params, _optimizer())
    del params  # the state holds (and the step donates) these very buffers
    step = CompiledOnce(jax.jit(make_sft_step(config, get_loss("sft")), donate_argnums=0))
    ids = random_ids(np.random.default_rng(1), sizes.big.vocab, sizes.sft_batch, sizes.sft_len)
    ones = jnp.ones(ids.shape, jnp.int32)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": ones, "loss_mask": ones}
    timing = time_one(_jax_runner(step, state, batch), sizes.warmup, sizes.repeats)
    return {
        "timing": timing,
        "measured": measured_peak_bytes(),
        "predicted": predicted_peak_bytes([(step, 0)]),
        "flops": train_flops(sizes.big, sizes.sft_batch, sizes.sft_len, lm_head=True),
        "tokens": sizes.sft_batch * sizes.sft_len,
    }


def mfu_cells(r: dict[str, Any]) -> dict[str, Any]:
    import jax

    t = r["timing"]
    achieved = r["flops"] / t.median
    speed = (
        f"{fmt(t.median)} s/step, {r['tokens'] / t.median:,.0f} tok/s, "
        f"{fmt(achieved / 1e12)} TFLOP/s; first step {t.first:.1f} s"
    )
    values = {"s_per_step": t.median, "first_s": t.first, "model_flops": r["flops"]}
    if on_cpu():
        return {
            "rlhf_jax": f"n/a on cpu ({speed})",
            "reference": "n/a on cpu (no bf16 peak)",
            "ratio": "",
            "values": values,
        }
    name = getattr(jax.devices()[0], "device_kind", "")
    peak = bf16_peak(name)
    if peak is None:
        return {
            "rlhf_jax": f"n/a: no bf16 peak known for {name!r} ({speed})",
            "reference": "",
            "ratio": "",
            "values": values,
        }
    flops, board = peak
    return {
        "rlhf_jax": f"{100 * achieved / flops:.1f}% MFU ({speed})",
        "reference": f"peak {flops / 1e12:.0f} TFLOP/s bf16 dense, assumed {board}",
        "ratio": "",
        "values": {**values, "mfu": achieved / flops, "peak_flops": flops, "board": board},
    }


def run_sft(sizes: Sizes, workdir: Path, rec: Recorder) -> None:
    result = Lazy(lambda: sft_step(sizes, workdir), "SFT step")
    rec.run("sft_mfu", lambda: mfu_cells(result.get()))
    rec.run("memory_sft", lambda: memory_cells(result.get()["measured"], result.get()["predicted"]))


# ----------------------------------------------------------------------------- RL


def rl_iteration_timed(sizes: Sizes, workdir: Path, algorithm: str) -> dict[str, Any]:
    """bench.rl_iteration's `JaxRL` (the jitted experience and update of one algorithm),
    both programs compiled through `CompiledOnce` so their memory analysis is at hand."""
    from bench.models import load_jax
    from rlhf_jax.loops.train import CompiledOnce

    folder, _ = ensure_checkpoint(sizes.small, workdir)
    prompts = random_ids(
        np.random.default_rng(2), sizes.small.vocab, sizes.rl.prompts, sizes.rl.prompt_len
    )
    rl = rl_iteration.JaxRL(*load_jax(folder), prompts, sizes.rl, algorithm)
    rl.experience, rl.update = CompiledOnce(rl.experience), CompiledOnce(rl.update)
    timing = time_one(rl.iteration, sizes.warmup, sizes.repeats)
    # The experience takes everything on the device as arguments, the reference's buffers
    # twice (it is also the reward model's trunk), which XLA counts twice. During the update
    # the frozen models and the prompts stay on the device without being its arguments.
    twice = repeated_bytes((rl.state, rl.frozen, rl.prompt_ids, rl.prompt_mask))
    resident = unique_bytes((rl.frozen, rl.prompt_ids, rl.prompt_mask))
    return {
        "timing": timing,
        "measured": measured_peak_bytes(),
        "predicted": predicted_peak_bytes([(rl.experience, -twice), (rl.update, resident)]),
        "samples": sizes.rl.prompts * sizes.rl.completions,
    }


def iteration_cells(r: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    t = r["timing"]
    return {
        "rlhf_jax": f"{fmt(t.median)} s/iteration, {r['samples'] * new_tokens / t.median:,.0f} "
        f"new tok/s; first {t.first:.1f} s (compile)",
        "reference": "",
        "ratio": "",
        "values": {"s_per_iteration": t.median, "first_s": t.first},
    }


def run_rl(sizes: Sizes, workdir: Path, rec: Recorder) -> None:
    new = sizes.rl.new_tokens
    ppo = Lazy(lambda: rl_iteration_timed(sizes, workdir, "ppo"), "PPO iteration")
    rec.run("ppo_iteration", lambda: iteration_cells(ppo.get(), new))
    # Read before GRPO allocates anything: the peak is the process's, PPO's alone so far.
    rec.run("memory_ppo", lambda: memory_cells(ppo.get()["measured"], ppo.get()["predicted"]))
    grpo = Lazy(lambda: rl_iteration_timed(sizes, workdir, "grpo"), "GRPO iteration")
    rec.run("grpo_iteration", lambda: iteration_cells(grpo.get(), new))
