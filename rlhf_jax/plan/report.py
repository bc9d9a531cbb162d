"""A plan as a human table or as JSON."""

from __future__ import annotations

from rlhf_jax.plan.advice import Context, Suggestion, largest_part, suggestions, together
from rlhf_jax.plan.check import Check
from rlhf_jax.plan.planner import PARTS, StagePlan

LABELS = {
    "params": "trainable weights",
    "optimizer": "optimizer state",
    "ema": "EMA weights",
    "frozen": "frozen models",
    "kept_weights": "starting weights kept",
    "kv_cache": "KV cache",
    "activations": "activations/temporaries",
    "batch": "batches and outputs",
}


def fmt_bytes(n: float) -> str:
    """Bytes in KiB / MiB / GiB, three significant figures or so."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value = n / size
            return f"{sign}{value:.{2 if value < 10 else 1}f} {unit}"
    return f"{sign}{int(n)} B"


def stage_json(stage: StagePlan, ctx: Context, checks: list[Check] | None = None) -> dict:
    peak, memory = stage.peak, ctx.device_memory
    combined = together(stage, ctx)
    return {
        "peak_bytes_per_device": peak,
        "parts": dict(stage.parts),
        "fits": peak <= memory,
        "headroom_bytes": memory - peak,
        "largest": largest_part(stage.parts),
        "program": stage.peak_program.name,
        "programs": {p.name: p.peak for p in stage.programs},
        # XLA:CPU's own peak, with the float32 weight copies the correction takes out
        "xla_cpu_peak_bytes": stage.xla_cpu_peak,
        "xla_cpu_copies_bytes": {p.name: p.cpu_copies for p in stage.programs},
        # the peak program's phases compiled alone, each one's temporaries (plan/advice.py)
        "phase_temporaries_bytes": dict(stage.peak_program.phases),
        "detail": {k: v for k, v in stage.build.detail.items() if v},
        "suggestions": [s.to_dict() for s in suggestions(stage, ctx)],
        "together": combined.to_dict() if combined else None,
        # --check: the named switches compiled (null without --check)
        "checked": None if checks is None else [c.to_dict() for c in checks],
    }


def plan_json(
    stages: list[StagePlan], ctx: Context, checks: dict[str, list[Check]] | None = None
) -> dict:
    """`{"stages": {name: {...}}, "device_memory_bytes": int, "fits": bool}`; `checks`:
    `--check`'s compiled switches by stage (None: not asked for)."""
    out = {
        s.name: stage_json(s, ctx, None if checks is None else checks.get(s.name, []))
        for s in stages
    }
    return {
        "stages": out,
        "device_memory_bytes": ctx.device_memory,
        "fits": all(s["fits"] for s in out.values()),
    }


def _share(peak: int, memory: int) -> str:
    share = 100 * peak / memory
    return f"{share:.1f}%" if share < 10 else f"{share:.0f}%"


def _verdict(peak: int, memory: int) -> str:
    if peak <= memory:
        return f"fits, {fmt_bytes(memory - peak)} headroom ({_share(peak, memory)} used)"
    return f"DOES NOT FIT: {fmt_bytes(peak - memory)} over ({_share(peak, memory)} of memory)"


def _suggestion_line(s: Suggestion, width: int) -> str:
    mark = "fits" if s.fits else "    "
    saves = "-" + fmt_bytes(s.saves)
    return f"    {s.switch:<{width}}  {saves:>11} -> {fmt_bytes(s.peak):>10}  {mark}  {s.note}"


def stage_block(stage: StagePlan, ctx: Context, checks: list[Check] | None = None) -> list[str]:
    parts, memory = stage.parts, ctx.device_memory
    lines = [
        f"{stage.name}: {fmt_bytes(stage.peak)} per device at its `{stage.peak_program.name}` "
        f"program -- {_verdict(stage.peak, memory)}"
    ]
    if len(stage.programs) > 1:
        each = ", ".join(f"{p.name} {fmt_bytes(p.peak)}" for p in stage.programs)
        lines.append(f"  programs: {each}")
    for part in PARTS:
        if parts[part]:
            lines.append(f"  {LABELS[part]:<24} {fmt_bytes(parts[part]):>11}")
    big = largest_part(parts)
    lines.append(f"  largest: {LABELS[big]} ({fmt_bytes(parts[big])})")
    if stage.xla_cpu_peak != stage.peak:
        lines.append(
            f"  corrected for accelerators: XLA:CPU's own figure is "
            f"{fmt_bytes(stage.xla_cpu_peak)}, with float32 copies of bf16 weights that a "
            "GPU/TPU compiler does not make (docs/memory.md)"
        )
    if stage.floor:
        lines.append(
            f"  optimizer update alone: {fmt_bytes(stage.floor)} of temporaries (gradients and "
            "Adam's buffers; no activation switch goes below it)"
        )
    found = suggestions(stage, ctx)
    if found:
        fitting = [s.switch for s in found if s.fits]
        if stage.peak > memory:
            lines.append(
                "  would fit with: " + (", ".join(fitting) if fitting else _together(stage, ctx))
            )
        lines.append(
            "  switches that lower the peak (estimated; --check or a plan with one compiles it):"
        )
        width = max(len(s.switch) for s in found)
        lines += [_suggestion_line(s, width) for s in found]
    if checks:
        lines.append("  checked by compiling the stage again with them (--check):")
        lines += [_check_line(c, ctx.device_memory) for c in checks]
    return lines


def _check_line(c: Check, memory: int) -> str:
    if c.peak is None:
        return f"    {c.switch}: could not be planned: {c.error}"
    verdict = "fits" if c.fits else f"DOES NOT FIT ({fmt_bytes(c.peak - memory)} over)"
    est = fmt_bytes(c.estimated)
    return f"    {c.switch}: {fmt_bytes(c.peak)} compiled (est. {est}), {verdict}"


def _together(stage: StagePlan, ctx: Context) -> str:
    t = together(stage, ctx)
    if t is None:
        return "no single switch"
    verdict = "" if t.fits else ", still does not fit"
    return f"no single switch; together: {t.switch} (est. {fmt_bytes(t.peak)}{verdict})"


def render_table(
    stages: list[StagePlan],
    ctx: Context,
    header: str,
    checks: dict[str, list[Check]] | None = None,
) -> str:
    memory = ctx.device_memory
    name_w = max(len(s.name) for s in stages)
    lines = [header, "", f"{'stage':<{name_w}}  {'peak/device':>11}  verdict"]
    for s in stages:
        lines.append(f"{s.name:<{name_w}}  {fmt_bytes(s.peak):>11}  {_verdict(s.peak, memory)}")
    for s in stages:
        lines += ["", *stage_block(s, ctx, (checks or {}).get(s.name))]
    return "\n".join(lines)
