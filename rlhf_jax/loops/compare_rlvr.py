"""`rlhf-jax compare` on a verifiable-reward task (`task.name: sums`): every row of
`compare.algorithms` trained from the same SFT policy on the reward function `ppo.reward_fn`
names (no reward model, as `loops/rlvr.py` builds it), at one budget of sampled responses,
once per seed (`compare.seeds`), and scored as the RLVR pipeline scores its GRPO policy.

Each row x seed: greedy exact accuracy on the held-out prompts (`rlvr.policy_report`:
`answer_eval.score_answers`' strict pass@1, Wilson interval), the lenient accuracy, the format
rate, the gain over SFT paired over prompts, the KL to SFT on its own samples at
`ppo.temperature`, wall time and peak device memory. Over several seeds every number is the
mean with a Student-t 95% interval across seeds (`compare_seeds.combine`), per-seed values in
`<metric>_seeds`. Writes OUT/report.json, report.md and accuracy_vs_kl.png.

The topics task's gold twins (`compare.reward_fn`) and offline preference rows have no meaning
here: there is no hidden gold reward beside the verifiable one and no rankings.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.advantages import estimator_needs_critic
from rlhf_jax.config import Config, compare_runs
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops import compare_seeds as cs
from rlhf_jax.loops.compare_rlvr_report import plot_accuracy_vs_kl, write_markdown
from rlhf_jax.loops.compare_rows import RowFacts
from rlhf_jax.loops.foundation import Foundation, build_foundation
from rlhf_jax.loops.foundation_runs import run_rl
from rlhf_jax.loops.report import write_json
from rlhf_jax.loops.rlvr import greedy_answers, kl_to_sft, paired_gain, policy_report
from rlhf_jax.models import save_hf

WILSON = "95% Wilson interval over held-out prompts (accuracy; one seed)"


def _without_gold_twins(cfg: Config) -> Config:
    """`compare.reward_fn` left at its default (the topics task's gold reward) is turned off,
    with a note; any other value is refused earlier (`usage.refuse_unread`)."""
    if cfg.compare.reward_fn is None:
        return cfg
    if jax.process_index() == 0:
        print(
            f"note: compare.reward_fn ({cfg.compare.reward_fn}, the topics task's gold-twin "
            f"rows) is off for task {cfg.task.name}: every row already trains on "
            f"ppo.reward_fn ({cfg.ppo.reward_fn})",
            file=sys.stderr,
        )
    return dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, reward_fn=None))


def run_compare_rlvr(cfg: Config, out_dir: str | Path, command: str, machine: dict) -> dict:
    """Build the foundation once without a reward model, run every row x seed from it."""
    if cfg.ppo.reward_fn is None:
        raise RlhfJaxError(
            f"config key 'ppo.reward_fn' is not set, but task.name {cfg.task.name!r} trains "
            f"no reward model: set ppo.reward_fn (e.g. {cfg.task.name}_exact) to score every row"
        )
    cfg = _without_gold_twins(cfg)
    t_start = time.time()
    runs = compare_runs(cfg)
    cs.check_seeds(cfg)
    f = build_foundation(cfg, out_dir, reward_model=False)
    sft_answers = greedy_answers(cfg, f, f.sft_params)
    sft = policy_report(cfg, f, sft_answers)
    report: dict[str, Any] = {"task": cfg.task.name, "sft": sft, "algorithms": {}}
    facts = RowFacts(f.out / "compare_rows.json", f.logger)
    for name, run in runs.items():
        per_seed = [
            _row(cfg, *cs.seeded(run, f, s), cs.label(name, s), sft_answers, facts)
            for s in range(cfg.compare.seeds)
        ]
        report["algorithms"][name] = cs.combine(per_seed)
    report["seeds"] = cfg.compare.seeds
    report["interval"] = WILSON if cfg.compare.seeds == 1 else cs.interval_text(cfg.compare.seeds)
    report["eval"] = {"prompts": sft["n_prompts"], "decoding": "greedy, one answer per prompt"}
    report["training"] = facts.training_summary()
    report["wall_seconds"] = time.time() - t_start
    report["machine"] = machine
    write_json(f.out / "report.json", report)
    plot_accuracy_vs_kl(report, f.out / "accuracy_vs_kl.png")
    write_markdown(f.out / "report.md", report, command)
    f.logger.close()
    return report


def _row(
    cfg: Config, run: Config, f: Foundation, name: str, sft_answers, facts: RowFacts
) -> dict[str, Any]:
    """One seed of one row (`name` its row x seed label; `run` and `f` carry that seed's
    seed and keys): trained, saved to OUT/policies/<name> and scored like rlvr.py's GRPO."""
    stage = f"rl_{name}"
    with facts.training(name, stage):
        params, _ = run_rl(run, f, stage, ptx=run.ptx.coef > 0)
    save_hf(f.model_cfg, params, f.out / "policies" / name, f.tokenizer)
    answers = greedy_answers(run, f, params)
    kl, sampled_accuracy = kl_to_sft(run, f, params)
    policy = policy_report(run, f, answers)
    gain = paired_gain(answers.gold, sft_answers.gold, cfg.eval.bootstrap, run.seed)
    p = run.ppo
    return {
        "accuracy": policy["accuracy"],
        "accuracy_ci": policy["accuracy_ci"],
        "lenient_accuracy": policy["lenient_accuracy"],
        "format_rate": policy["format_rate"],
        "gain": gain["gain"],
        "gain_ci": gain["gain_ci"],
        "kl_to_sft": kl,
        "sampled_accuracy": sampled_accuracy,
        **facts.of(name),
        "reward": p.reward_fn,
        "setup": {
            "advantage": p.advantage,
            "samples_per_prompt": p.samples_per_prompt,
            "rollout_batch": p.rollout_batch,
            "iterations": p.iterations,
            "kl_penalty": p.kl_penalty,
            "policy_loss": p.policy_loss,
            "policy_loss_kwargs": p.policy_loss_kwargs,
            "loss_reduction": p.loss_reduction,
            "critic": "yes" if estimator_needs_critic(p.advantage) else "no",
        },
        "samples": [{"prompt": q, "response": r} for q, r in zip(f.eval_prompts, answers.texts)][
            :4
        ],
    }
