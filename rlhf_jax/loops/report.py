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
    fig.savefig(path, dpi=110)
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
