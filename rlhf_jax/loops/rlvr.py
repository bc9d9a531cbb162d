"""The pipeline on a verifiable-reward task (RLVR): data -> pretrain -> SFT -> RL -> eval.

No reward model: the RL stage (GRPO in configs/rlvr_quickstart.yaml) is scored by the reward
function `ppo.reward_fn` names (e.g. `sums_exact`). Both the SFT and the RL policy then answer
every held-out prompt greedily; the report gives each one's exact accuracy with its Wilson
95% interval, the format rate, the paired gain RL - SFT over the same prompts with a
percentile-bootstrap 95% interval of the per-prompt differences, and the KL of the RL policy
to SFT on its own samples at `ppo.temperature`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.answer_eval import score_answers
from rlhf_jax.loops.foundation import Foundation, build_foundation
from rlhf_jax.loops.foundation_runs import evaluate_policy, run_rl
from rlhf_jax.loops.report import plot_curves, training_summary, write_json
from rlhf_jax.models import save_hf
from rlhf_jax.tasks import TASKS

STAGE = "grpo"  # the RL stage's name in metrics.jsonl, checkpoints and the report


def greedy_answers(cfg: Config, f: Foundation, params) -> ev.GoldEval:
    """One greedy answer per held-out prompt, scored 1/0 by the task's exact reward."""
    exact = TASKS[cfg.task.name].exact_reward
    return evaluate_policy(cfg, f, params, score=exact, temperature=0.0, n_samples=1)


def paired_gain(after: np.ndarray, before: np.ndarray, n_resamples: int, seed: int) -> dict:
    """Mean of the per-prompt differences `after - before` with a percentile-bootstrap 95%
    interval that resamples prompts (so both policies' answers to a prompt move together)."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    return {
        "gain": float(diff.mean()),
        "gain_ci": ev.bootstrap_mean_ci(diff, n_resamples, seed),
        "gain_ci_method": f"percentile bootstrap of per-prompt differences, {n_resamples} "
        "resamples of the prompts",
    }


def kl_to_sft(cfg: Config, f: Foundation, params) -> tuple[float, float]:
    """(KL estimate per response, sampled accuracy) of the RL policy's own samples at
    `ppo.temperature` on the held-out prompts: log pi - log pi_sft, averaged."""
    t = cfg.ppo.temperature
    exact = TASKS[cfg.task.name].exact_reward
    sampled = evaluate_policy(cfg, f, params, score=exact, temperature=t, n_samples=1)
    kl = ev.kl_to_reference(f.model_cfg, params, f.sft_params, sampled.samples, t, 128, f.runtime)
    return float(np.mean(kl)), float(sampled.gold.mean())


def policy_report(cfg: Config, f: Foundation, answers: ev.GoldEval) -> dict[str, Any]:
    """Greedy exact accuracy (`answer_eval.score_answers`' strict pass@1, one trial per
    prompt, with its Wilson 95% interval), the lenient reading's accuracy and the format rate
    (a `#### N` answer at all) of one answer per held-out prompt."""
    task = TASKS[cfg.task.name]
    references = [task.reference_answer(p) for p in f.eval_prompts]
    scores = score_answers([[t] for t in answers.texts], references, seed=cfg.seed)
    return {
        "accuracy": scores["strict"]["pass@1"],
        "accuracy_ci": scores["strict"]["pass@1_ci"],
        "lenient_accuracy": scores["lenient"]["pass@1"],
        "format_rate": scores["format_rate"],
        "n_prompts": scores["n_prompts"],
    }


def run_rlvr(
    cfg: Config, out_dir: str | Path, command: str, machine: dict[str, str], *, algo: Any = None
) -> dict:
    """Every stage of a verifiable-reward task; writes the checkpoints (OUT/sft, OUT/policy),
    metrics.jsonl, report.json, report.md and curves.png; returns the report. `machine`
    describes where it ran (`pipeline.machine()`), for the report."""
    if cfg.ppo.reward_fn is None:
        raise RlhfJaxError(
            f"config key 'ppo.reward_fn' is not set, but task.name {cfg.task.name!r} trains "
            f"no reward model: set ppo.reward_fn (e.g. {cfg.task.name}_exact) to score the RL "
            "stage"
        )
    t_start = time.time()
    f = build_foundation(cfg, out_dir, reward_model=False, algo=algo)
    # Its reward is the function: no ptx batches unless ptx.coef asks for them.
    params, _ = run_rl(
        cfg, f, STAGE, ptx=cfg.ptx.coef > 0, adapter_dir=f.out / "policy_adapter", algo=f.algo
    )
    save_hf(f.model_cfg, params, f.out / "policy", f.tokenizer)

    sft_answers = greedy_answers(cfg, f, f.sft_params)
    rl_answers = greedy_answers(cfg, f, params)
    kl, sampled_accuracy = kl_to_sft(cfg, f, params)
    report: dict[str, Any] = {
        "task": cfg.task.name,
        "rl": {
            "reward_fn": cfg.ppo.reward_fn,
            "advantage": cfg.ppo.advantage,
            "samples_per_prompt": cfg.ppo.samples_per_prompt,
            "iterations": cfg.ppo.iterations,
        },
        "sft": policy_report(cfg, f, sft_answers),
        STAGE: {
            **policy_report(cfg, f, rl_answers),
            **paired_gain(rl_answers.gold, sft_answers.gold, cfg.eval.bootstrap, cfg.seed),
            "kl_to_sft": kl,
            "sampled_accuracy": sampled_accuracy,
        },
        "samples": [
            {"prompt": p, "sft": a, STAGE: b}
            for p, a, b in list(zip(f.eval_prompts, sft_answers.texts, rl_answers.texts))[:8]
        ],
        "data_summary": [r.summary() for r in f.reports] + f.notes,
        "training": training_summary(f.logger),
        "wall_seconds": time.time() - t_start,
    }
    report["machine"] = machine
    write_json(f.out / "report.json", report)
    plot_curves(f.logger.history, f.out / "curves.png")
    write_markdown(f.out / "report.md", report, command)
    f.logger.close()
    return report


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def summary_line(report: dict[str, Any]) -> str:
    """One line for the terminal: accuracies, the paired gain and the wall time."""
    sft, rl = report["sft"], report[STAGE]
    return (
        f"exact accuracy SFT {sft['accuracy']:.3f} {_ci(sft['accuracy_ci'])} -> GRPO "
        f"{rl['accuracy']:.3f} {_ci(rl['accuracy_ci'])}; gain {rl['gain']:+.3f} "
        f"{_ci(rl['gain_ci'])}; format rate {sft['format_rate']:.2f} -> "
        f"{rl['format_rate']:.2f}; {report['wall_seconds']:.0f} s"
    )


def write_markdown(path: Path, report: dict[str, Any], command: str) -> None:
    """A short human summary of report.json."""
    sft, rl, algo = report["sft"], report[STAGE], report["rl"]
    lines = [
        f"# rlhf_jax RLVR report: task {report['task']}",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {report['wall_seconds']:.0f} s on {report['machine']['devices']}  ",
        f"RL: advantage {algo['advantage']}, reward function {algo['reward_fn']}, "
        f"{algo['samples_per_prompt']} samples per prompt, {algo['iterations']} iterations",
        "",
        f"Greedy answers to {sft['n_prompts']} held-out prompts:",
        "",
        "| | SFT | GRPO |",
        "|---|---|---|",
        f"| exact accuracy (Wilson 95% CI) | {sft['accuracy']:.3f} {_ci(sft['accuracy_ci'])} | "
        f"{rl['accuracy']:.3f} {_ci(rl['accuracy_ci'])} |",
        f"| lenient accuracy (last number) | {sft['lenient_accuracy']:.3f} | "
        f"{rl['lenient_accuracy']:.3f} |",
        f"| format rate (a `#### N` answer) | {sft['format_rate']:.3f} | {rl['format_rate']:.3f} |",
        "",
        f"- GRPO - SFT exact accuracy: {rl['gain']:+.3f} (95% CI {_ci(rl['gain_ci'])}, "
        f"{rl['gain_ci_method']})",
        f"- KL(GRPO || SFT) per response on its own samples: {rl['kl_to_sft']:.3f} nats "
        f"(sampled accuracy {rl['sampled_accuracy']:.3f})",
        "",
        "## Samples",
        "",
        *(f"- `{s['prompt']}` SFT: `{s['sft']!r}` GRPO: `{s[STAGE]!r}`" for s in report["samples"]),
    ]
    if report.get("data_summary"):
        lines += ["", "## Data", ""] + [f"- {s}" for s in report["data_summary"]]
    lines += ["", "![training curves](curves.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
