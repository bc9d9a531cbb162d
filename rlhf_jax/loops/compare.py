"""`rlhf-jax compare`: several RL algorithms from the same SFT policy and reward model, with the
same budget of sampled responses, scored on the same held-out prompts by the task's gold
reward; each also once more against the gold reward used directly as a verifiable reward.

Writes OUT/report.json (`sft.gold_reward`, `algorithms.<name>.{gold_reward, gold_reward_ci,
win_rate_vs_sft, kl_to_sft, wall_seconds, peak_device_mib, ...}`), report.md (the table),
gold_vs_kl.png and every run's metrics and policy (OUT/policies/<name>). Each run is a stage
with its own checkpoints, so rerunning the command continues where it stopped. With
`compare.seeds` > 1 every row runs once per seed and its numbers are means over seeds with
Student-t intervals (loops/compare_seeds.py). On a verifiable-reward task (`task.name: sums`)
the comparison is loops/compare_rlvr.py's: no reward model, exact-answer accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_jax.advantages import estimator_needs_critic
from rlhf_jax.config import Config, compare_preference_runs, compare_runs
from rlhf_jax.loops import compare_seeds as cs
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.checks import require_language_model
from rlhf_jax.loops.compare_rows import RowFacts
from rlhf_jax.loops.foundation import Foundation, build_foundation
from rlhf_jax.loops.foundation_runs import evaluate_policy, run_rl
from rlhf_jax.loops.pipeline import machine
from rlhf_jax.loops.preference import preference_metrics, train_preference, with_reference_logps
from rlhf_jax.loops.report import plot_gold_vs_kl, write_compare_markdown, write_json
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.settings import pipeline_settings
from rlhf_jax.loops.train import StageRun
from rlhf_jax.loops.usage import refuse_unread
from rlhf_jax.models import save_hf
from rlhf_jax.tasks import VERIFIABLE


def run_compare(cfg: Config, out_dir: str | Path, command: str = "") -> dict:
    """Build the foundation once, run every algorithm of `compare.algorithms` from it."""
    if cfg.model.path is not None:
        require_language_model(cfg.model.path, "model.path")
    refuse_unread(cfg, "compare")
    if cfg.task.name in VERIFIABLE:  # no reward model: every row on ppo.reward_fn
        from rlhf_jax.loops.compare_rlvr import run_compare_rlvr

        return run_compare_rlvr(cfg, out_dir, command, machine())
    t_start = time.time()
    runs = compare_runs(cfg)
    cs.check_seeds(cfg)
    f = build_foundation(cfg, out_dir)
    boot, seed = cfg.eval.bootstrap, cfg.seed
    sft_eval = evaluate_policy(cfg, f, f.sft_params)
    report: dict = {
        "sft": {
            "gold_reward": float(sft_eval.gold.mean()),
            "gold_reward_ci": ev.bootstrap_mean_ci(sft_eval.per_prompt, boot, seed),
        },
        "rm": {"heldout_accuracy": f.rm_heldout["accuracy"]},
        "algorithms": {},
    }
    facts = RowFacts(f.out / "compare_rows.json", f.logger)
    seeds = range(cfg.compare.seeds)
    for name, run in runs.items():
        per_seed = [
            _rl_run(cfg, *cs.seeded(run, f, s), cs.label(name, s), sft_eval, facts) for s in seeds
        ]
        report["algorithms"][name] = cs.combine(per_seed)
    for name, run in compare_preference_runs(cfg).items():
        per_seed = [
            _preference_run(cfg, *cs.seeded(run, f, s), cs.label(name, s), sft_eval, facts)
            for s in seeds
        ]
        report["algorithms"][name] = cs.combine(per_seed)
    report["seeds"] = cfg.compare.seeds
    report["interval"] = cs.interval_text(cfg.compare.seeds)
    report["eval"] = {"prompts": len(f.eval_prompts), "samples_per_prompt": cfg.eval.n_samples}
    report["training"] = facts.training_summary()
    report["wall_seconds"] = time.time() - t_start
    report["machine"] = machine()
    write_json(f.out / "report.json", report)
    plot_gold_vs_kl(report, f.out / "gold_vs_kl.png")
    write_compare_markdown(f.out / "report.md", report, command)
    f.logger.close()
    return report


def _rl_run(cfg: Config, run: Config, f: Foundation, name: str, sft_eval, facts: RowFacts) -> dict:
    """One seed of one `compare.algorithms` row (`name` is the row x seed's label; `run` and
    `f` carry that seed's keys): trained, saved and evaluated against the SFT policy."""
    stage = f"rl_{name}"
    with facts.training(name, stage):
        params, state = run_rl(run, f, stage, ptx=run.ptx.coef > 0)
    save_hf(f.model_cfg, params, f.out / "policies" / name, f.tokenizer)
    result = evaluate_policy(cfg, f, params)
    kl = ev.kl_to_reference(
        f.model_cfg, params, f.sft_params, result.samples, cfg.eval.temperature, 128, f.runtime
    )
    p = run.ppo
    return {
        **ev.compare_to_reference(result, sft_eval, kl, cfg.eval.bootstrap, run.seed),
        **facts.of(name),
        "final_beta": float(state.beta),
        "reward": p.reward_fn or "reward model",
        "setup": {
            "advantage": p.advantage,
            "samples_per_prompt": p.samples_per_prompt,
            "rollout_batch": p.rollout_batch,
            "kl_penalty": p.kl_penalty,
            "policy_loss": p.policy_loss,
            "critic": "yes" if estimator_needs_critic(p.advantage) else "no",
            "rollout_filters": [f.name for f in p.rollout_filters],
        },
        "samples": [
            {"prompt": q, "response": r}
            for q, r in zip(f.eval_prompts, result.texts[:: cfg.eval.n_samples])
        ][:4],
    }


def _preference_run(
    cfg: Config, run: Config, f: Foundation, name: str, sft_eval, facts: RowFacts
) -> dict:
    """One seed of one `compare.preference` row: offline from the SFT policy on the rankings
    the reward model was trained on, evaluated like the RL runs."""
    stage = f"dpo_{name}"
    d = run.dpo
    with facts.training(name, stage):
        train = with_reference_logps(
            f.model_cfg, f.sft_params, f.rank_train, d.batch_size, f.runtime
        )
        params = train_preference(
            run,
            f.model_cfg,
            f.sft_params,
            train,
            StageRun(
                key=f.keys["ppo"],
                logger=f.logger,
                runtime=f.runtime,
                checkpoints=StageCheckpoints(
                    f.out, stage, cfg.checkpoint, pipeline_settings(run, "dpo")
                ),
            ),
            stage=stage,
        )
    save_hf(f.model_cfg, params, f.out / "policies" / name, f.tokenizer)
    result = evaluate_policy(cfg, f, params)
    kl = ev.kl_to_reference(
        f.model_cfg, params, f.sft_params, result.samples, cfg.eval.temperature, 128, f.runtime
    )
    held = with_reference_logps(f.model_cfg, f.sft_params, f.rank_heldout, d.batch_size, f.runtime)
    return {
        **ev.compare_to_reference(result, sft_eval, kl, cfg.eval.bootstrap, run.seed),
        **facts.of(name),
        "reward": "rankings (offline)",
        "heldout_pair_accuracy": preference_metrics(run, f.model_cfg, params, held, f.runtime)[
            "accuracy"
        ],
        "setup": {
            "loss": "dpo" if d.loss == "default" else d.loss,
            "loss_kwargs": d.loss_kwargs,
            "beta": d.beta,
            "steps": d.steps,
            "batch_size": d.batch_size,
        },
        "samples": [
            {"prompt": q, "response": r}
            for q, r in zip(f.eval_prompts, result.texts[:: cfg.eval.n_samples])
        ][:4],
    }
