"""The plan's accelerator correction (plan/correction.py): what it removes is XLA:CPU's
float32 copies of bf16 weights, checked against the peak memory of real CPU runs of both
executables, and nothing else; and the advice's switches for a stage that does not fit."""

import json

from plan_shapes import CONFIG, SMALL
from processes import LIMIT_S

from rlhf_jax.cli import main
from rlhf_jax.config import Config, load_config
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.plan import abstract as ab
from rlhf_jax.plan.correction import NO_HOIST
from rlhf_jax.plan.measure import measure_in_subprocess
from rlhf_jax.plan.planner import builders

BF16 = ["model.dtype=bfloat16", "model.param_dtype=bfloat16", "model.frozen_dtype=bfloat16"]


def _temps(overrides: list[str], options: dict) -> dict[str, int]:
    cfg = load_config(Config, CONFIG, overrides)
    runtime = Runtime.from_config(cfg)
    out = {}
    for name, build_fn in builders(cfg, runtime).items():
        build = build_fn()
        ab.abstract_stage(build, runtime)
        for p in build.program_list:
            compiled = p.jitted.lower(*p.args).compile(compiler_options=options)
            out[f"{name}/{p.name}"] = compiled.memory_analysis().temp_size_in_bytes
    return out


def test_without_bf16_the_pass_the_correction_turns_off_changes_nothing_of_size():
    """The soundness argument: in float32 programs (no bf16 matmul for XLA:CPU to convert)
    the SFT step and both PPO programs need the same temporaries with hoisting on or off, so
    the only thing switching it off removes is the hoisted float32 copies."""
    on, off = _temps(SMALL, {}), _temps(SMALL, NO_HOIST)
    assert set(on) == {"sft/step", "ppo/experience", "ppo/update"}
    for name in on:
        assert abs(off[name] - on[name]) <= 0.01 * on[name], (name, on[name], off[name])


def test_the_corrected_figure_and_xla_cpus_own_each_match_a_measured_run():
    """A bf16 SFT step of a model whose weights dominate: the plan's corrected figure against
    the measured peak of the executable it comes from, and XLA:CPU's own figure against a
    run of XLA:CPU's own executable; the copies the correction removes are real memory."""
    overrides = [
        *BF16,
        "model.d_model=512",
        "model.n_layers=6",
        "model.n_heads=8",
        "model.n_kv_heads=2",
        "model.mlp_dim=2048",
        "task.vocab_size=4096",
        "sft.batch_size=4",
        "sft.max_len=64",
    ]
    fixed = measure_in_subprocess(CONFIG, "sft", overrides, timeout=LIMIT_S)
    raw = measure_in_subprocess(CONFIG, "sft", overrides, timeout=LIMIT_S, corrected=False)
    copies = fixed["xla_cpu_copies"]["step"]
    assert copies > 0.08 * fixed["measured_bytes"], fixed  # 11% at these shapes
    assert 0.8 <= fixed["ratio"] <= 1.2, fixed
    assert 0.8 <= raw["ratio"] <= 1.2, raw
    assert raw["planned_bytes"] == fixed["planned_bytes"] + copies
    removed = raw["measured_bytes"] - fixed["measured_bytes"]
    assert 0.7 * copies <= removed <= 1.3 * copies, (removed, copies)


def test_a_bf16_plan_reports_both_figures(capsys):
    """Float32 plans are untouched (the first test: no bf16, nothing to correct)."""
    assert main(["plan", "--config", CONFIG, *SMALL, *BF16, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for stage in plan["stages"].values():
        copies = stage["xla_cpu_copies_bytes"]
        assert max(copies.values()) > 0
        assert stage["xla_cpu_peak_bytes"] == max(
            peak + copies[name] for name, peak in stage["programs"].items()
        )
        assert stage["xla_cpu_peak_bytes"] > stage["peak_bytes_per_device"]
