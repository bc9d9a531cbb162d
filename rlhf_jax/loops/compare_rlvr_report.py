"""report.md and accuracy_vs_kl.png of the RLVR comparison (`loops/compare_rlvr.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _setup_text(setup: dict[str, Any]) -> str:
    extra = "".join(f", {k} {v}" for k, v in setup["policy_loss_kwargs"].items())
    return (
        f"advantage {setup['advantage']}, G={setup['samples_per_prompt']} x "
        f"{setup['rollout_batch']} prompts x {setup['iterations']} iterations, KL in "
        f"{setup['kl_penalty']}, policy loss {setup['policy_loss']}{extra}, reduction "
        f"{setup['loss_reduction'] or 'the loss default'}, critic {setup['critic']}"
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per row for the terminal, best accuracy first."""
    sft = report["sft"]["accuracy"]
    rows = sorted(report["algorithms"].items(), key=lambda kv: -kv[1]["accuracy"])
    return [
        f"{name:>16}: exact {r['accuracy']:.3f} {_ci(r['accuracy_ci'])} (SFT {sft:.3f}), "
        f"KL {r['kl_to_sft']:.2f}, {r['wall_seconds']:.0f} s"
        for name, r in rows
    ]


def write_markdown(path: Path, report: dict[str, Any], command: str) -> None:
    """The comparison as a table, best accuracy first."""
    sft, seeds = report["sft"], report["seeds"]
    rows = sorted(report["algorithms"].items(), key=lambda kv: -kv[1]["accuracy"])
    which = "Wilson CI" if seeds == 1 else f"t-interval, {seeds} seeds"
    gain_which = "paired bootstrap CI" if seeds == 1 else which
    lines = [
        f"# rlhf_jax RLVR comparison: task {report['task']}",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {report['wall_seconds']:.0f} s on {report['machine']['devices']}; "
        f"{report['eval']['prompts']} held-out prompts, one greedy answer each, scored exact "
        "(`#### N`).",
        "",
        f"SFT exact accuracy: {sft['accuracy']:.3f} {_ci(sft['accuracy_ci'])} (Wilson 95%); "
        f"format rate {sft['format_rate']:.3f}. One SFT policy serves every row and seed.",
        "",
        f"Intervals in the table: {report['interval']}.",
        "",
        f"| algorithm | exact accuracy [{which}] | gain vs SFT [{gain_which}] | lenient "
        "accuracy | format rate | KL to SFT | wall (s) | peak device MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        peak = r.get("peak_device_mib")
        lines.append(
            f"| {name} | {r['accuracy']:.3f} {_ci(r['accuracy_ci'])} | {r['gain']:+.3f} "
            f"{_ci(r['gain_ci'])} | {r['lenient_accuracy']:.3f} | {r['format_rate']:.3f} | "
            f"{r['kl_to_sft']:.2f} | {r['wall_seconds']:.0f} | "
            f"{'-' if peak is None else f'{peak:.0f}'} |"
        )
    if seeds > 1:
        lines += ["", "Per seed (exact accuracy):", ""]
        lines += [
            f"- {name}: {', '.join(f'{v:.3f}' for v in r['accuracy_seeds'])}" for name, r in rows
        ]
    lines += [
        "",
        "Setups: "
        + "; ".join(f"{n}: {_setup_text(r['setup'])}" for n, r in report["algorithms"].items()),
        "",
        "KL to SFT: log pi - log pi_SFT per response on one sample per held-out prompt at "
        "ppo.temperature. Wall (s): training time of one seed (mean over seeds). Peak device "
        "MiB: XLA's memory analysis of the largest compiled program of the run.",
        "",
        "![exact accuracy against KL](accuracy_vs_kl.png)",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot_accuracy_vs_kl(report: dict[str, Any], path: Path) -> Path:
    """Exact accuracy against KL to SFT, one colour per row: each seed's point small and
    faint, the mean with its interval (the report's `interval`) drawn over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    sft = report["sft"]
    lo, hi = sft["accuracy_ci"]
    ax.axhspan(lo, hi, color="0.85", label="SFT (Wilson 95%)")
    ax.plot([0.0], [sft["accuracy"]], "ks", label="SFT")
    for i, (name, row) in enumerate(report["algorithms"].items()):
        color, y = f"C{i % 10}", row["accuracy"]
        if "accuracy_seeds" in row:
            ax.scatter(row["kl_to_sft_seeds"], row["accuracy_seeds"], s=16, color=color,
                       alpha=0.35, linewidths=0)  # fmt: skip
        ylo, yhi = row["accuracy_ci"]
        ax.errorbar(row["kl_to_sft"], y, yerr=[[y - ylo], [yhi - y]], fmt="o", color=color,
                    capsize=3, label=name)  # fmt: skip
    seeds = report["seeds"]
    ax.set_xlabel("KL(policy || SFT) per response (nats)")
    ax.set_ylabel("greedy exact accuracy on held-out prompts")
    ax.set_title(
        f"task {report['task']}: "
        + (
            "bars: 95% Wilson interval over prompts (one seed)"
            if seeds == 1
            else f"large: mean of {seeds} seeds, bars: 95% t-interval over seeds; faint: each seed"
        ),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with path.open("wb") as fh:  # a file object: the path may be a bucket URL (epath)
        fig.savefig(fh, dpi=110, format="png")
    plt.close(fig)
    return path
