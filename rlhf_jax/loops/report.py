"""What a pipeline run leaves for people: report.json, report.md and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (stage, metric, panel title) for the training-curves figure.
CURVES = (
    ("pretrain", "sft/loss", "pretraining loss"),
    ("sft", "sft/loss", "SFT loss"),
    ("rm", "rm/accuracy", "RM train accuracy"),
    ("ppo", "objective/scores", "PPO: RM score"),
    ("ppo", "objective/kl", "PPO: KL to SFT"),
    ("ppo", "ppo/ptx/loss", "PPO: ptx loss"),
    ("grpo", "objective/scores", "GRPO: reward function score"),  # RLVR (loops/rlvr.py)
    ("grpo", "objective/kl", "GRPO: KL to SFT"),
)


def training_summary(logger) -> dict[str, Any]:
    """Updates skipped for NaN/Inf gradients per stage (from each stage's last logged row) and
    every warning the run logged."""
    skipped = {}
    for stage, rows in logger.history.items():
        if rows:
            counts = {k: int(v) for k, v in rows[-1].items() if k.endswith("skipped_updates")}
            skipped[stage] = counts
    return {"skipped_updates": skipped, "warnings": list(logger.warnings)}


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def plot_curves(history: dict[str, list[dict[str, float]]], path: Path) -> Path | None:
    """One panel per curve that was logged; returns the path, or None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, m, t) for s, m, t in CURVES if any(m in r for r in history.get(s, []))]
    extra = [s for s in history if s.startswith("ppo_") and history[s]]
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (stage, metric, title) in zip(axes.flat, panels):
        for name in [stage] + [e for e in extra if stage == "ppo"]:
            rows_ = [r for r in history.get(name, []) if metric in r]
            label = "default" if name == "ppo" else name.removeprefix("ppo_")
            ax.plot([r["step"] for r in rows_], [r[metric] for r in rows_], label=label)
        ax.set_title(title)
        ax.set_xlabel("step" if stage != "ppo" else "iteration")
        ax.grid(alpha=0.3)
        if stage == "ppo" and extra:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    with path.open("wb") as f:  # a file object: the path may be a bucket URL (epath)
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_markdown(path: Path, report: dict[str, Any], command: str) -> None:
    """A short human summary of report.json."""
    sft, ppo, rm = report["sft"], report["ppo"], report["rm"]
    lines = [
        "# rlhf_jax pipeline report",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {report['wall_seconds']:.0f} s on {report['machine']['devices']}",
        "",
        "| | SFT | PPO |",
        "|---|---|---|",
        f"| gold reward (mean, 95% CI) | {_fmt(sft['gold_reward'])} "
        f"[{_fmt(sft['gold_reward_ci'][0])}, {_fmt(sft['gold_reward_ci'][1])}] | "
        f"{_fmt(ppo['gold_reward'])} [{_fmt(ppo['gold_reward_ci'][0])}, "
        f"{_fmt(ppo['gold_reward_ci'][1])}] |",
        f"| pretraining loss (held-out text) | {_fmt(report['pretrain_loss']['sft'])} | "
        f"{_fmt(report['pretrain_loss']['ppo'])} |",
        "",
        f"- PPO - SFT gold reward: {_fmt(ppo['gold_gain'])} "
        f"(95% CI [{_fmt(ppo['gold_gain_ci'][0])}, {_fmt(ppo['gold_gain_ci'][1])}])",
        f"- PPO win rate vs SFT (gold reward, ties half): {_fmt(ppo['win_rate_vs_sft'])}",
        f"- KL(PPO || SFT) per response: {_fmt(ppo['kl_to_sft'])} nats",
        f"- RM held-out pairwise accuracy: {_fmt(rm['heldout_accuracy'])}",
    ]
    if "ablation" in report:
        ab = report["ablation"]
        lines += [
            "",
            "## Ablation: PPO without the pretraining mix (ptx.coef=0)",
            "",
            f"- pretraining loss after PPO: {_fmt(ab['no_ptx']['pretrain_loss'])} without ptx "
            f"vs {_fmt(report['pretrain_loss']['ppo'])} with ptx "
            f"(SFT: {_fmt(report['pretrain_loss']['sft'])})",
            f"- gold reward without ptx: {_fmt(ab['no_ptx']['gold_reward'])}",
        ]
    if report.get("data_summary"):
        lines += ["", "## Data", ""] + [f"- {s}" for s in report["data_summary"]]
    lines += ["", "![training curves](curves.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def plot_gold_vs_kl(report: dict[str, Any], path: Path) -> Path:
    """Gold reward (95% interval) against KL to SFT for every algorithm of a comparison, one
    colour per algorithm (legend): filled markers trained on the reward model, hollow ones on
    the gold reward itself. Over several seeds: each seed's point, faint, and the mean with
    its Student-t interval across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    sft = report["sft"]
    lo, hi = sft["gold_reward_ci"]
    ax.axhspan(lo, hi, color="0.85", label="SFT (95% interval)")
    ax.plot([0.0], [sft["gold_reward"]], "ks", label="SFT")
    colors: dict[str, str] = {}
    for name, row in report["algorithms"].items():
        base = name.removesuffix("_gold")
        new = base not in colors
        color = colors.setdefault(base, f"C{len(colors)}")
        gold = name.endswith("_gold")
        y, (ylo, yhi) = row["gold_reward"], row["gold_reward_ci"]
        marker = "D" if row.get("reward") == "rankings (offline)" else "o"
        if "gold_reward_seeds" in row:  # each seed small and faint, the mean drawn over them
            ax.scatter(
                row["kl_to_sft_seeds"],
                row["gold_reward_seeds"],
                s=14,
                marker=marker,
                color=color,
                alpha=0.35,
                linewidths=0,
            )
        ax.errorbar(
            row["kl_to_sft"],
            y,
            yerr=[[y - ylo], [yhi - y]],
            fmt=marker,
            color=color,
            mfc="white" if gold else color,
            capsize=3,
            label=base if new else None,
        )
    ax.set_xlabel("KL(policy || SFT) per response (nats)")
    ax.set_ylabel("gold reward on held-out prompts")
    seeds = report.get("seeds", 1)
    ax.set_title(
        "filled: RL on the reward model; hollow: RL on the gold reward; "
        "diamond: offline on the rankings\n"
        + (
            "bars: 95% bootstrap interval over prompts (one seed)"
            if seeds == 1
            else f"large: mean of {seeds} seeds, bars: 95% t-interval over seeds; faint: each seed"
        ),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)  # the empty region between SFT and the runs
    fig.tight_layout()
    with path.open("wb") as f:  # a file object: the path may be a bucket URL (epath)
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def _setup_text(setup: dict[str, Any]) -> str:
    if "advantage" not in setup:  # an offline preference run
        kwargs = "".join(f", {k} {v}" for k, v in setup.get("loss_kwargs", {}).items())
        return (
            f"{setup['loss']} loss (beta {setup['beta']:g}{kwargs}) offline on the RM's "
            f"rankings, {setup['steps']} steps x {setup['batch_size']} prompts"
        )
    filters = "".join(f", filter {name}" for name in setup.get("rollout_filters", ()))
    return (
        f"advantage {setup['advantage']}, G={setup['samples_per_prompt']} x "
        f"{setup['rollout_batch']} prompts, KL in {setup['kl_penalty']}, critic {setup['critic']}"
        f"{filters}"
    )


def _interval_note(seeds: int) -> str:
    if seeds == 1:
        return "95% percentile bootstrap over the held-out prompts of the one seed"
    return (
        f"means over {seeds} seeds (compare.seeds) with the 95% Student-t interval across "
        "seeds; wall (s) is the mean per seed. Per-seed values: report.json `<metric>_seeds`"
    )


def write_compare_markdown(path: Path, report: dict[str, Any], command: str) -> None:
    """The comparison as a table, best gold reward first."""
    sft = report["sft"]
    rows = sorted(report["algorithms"].items(), key=lambda kv: -kv[1]["gold_reward"])
    seeds = report.get("seeds", 1)
    which = "bootstrap CI" if seeds == 1 else f"t-interval, {seeds} seeds"
    lines = [
        "# rlhf_jax algorithm comparison",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {report['wall_seconds']:.0f} s on {report['machine']['devices']}; "
        f"{report['eval']['prompts']} held-out prompts x {report['eval']['samples_per_prompt']} "
        "samples, scored by the task's gold reward.",
        "",
        f"SFT gold reward: {sft['gold_reward']:.3f} {_ci(sft['gold_reward_ci'])} (95% bootstrap "
        "interval over prompts; one SFT policy serves every row and seed)",
        "",
        f"Intervals in the table: {_interval_note(seeds)}.",
        "",
        f"| algorithm | trained on | gold reward [{which}] | gain vs SFT [{which}] "
        "| win rate vs SFT | KL to SFT | wall (s) | peak device MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        peak = r.get("peak_device_mib")
        lines.append(
            f"| {name} | {r['reward']} | {r['gold_reward']:.3f} {_ci(r['gold_reward_ci'])} | "
            f"{r['gold_gain']:+.3f} {_ci(r['gold_gain_ci'])} | {r['win_rate_vs_sft']:.3f} | "
            f"{r['kl_to_sft']:.2f} | {r['wall_seconds']:.0f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} |"
        )
    lines += [
        "",
        "Setups: "
        + "; ".join(
            f"{name}: {_setup_text(r['setup'])}"
            for name, r in report["algorithms"].items()
            if not name.endswith("_gold")
        ),
        "",
        "Peak device MiB: XLA's memory analysis of the largest compiled program of the run "
        "(arguments + outputs + temporaries, per device).",
        "",
        "![gold reward against KL](gold_vs_kl.png)",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
