"""The whole InstructGPT pipeline on one config: data -> (pretrain) -> SFT -> RM -> RL -> eval.

The foundation (data, base model, SFT, reward model) is `loops/foundation.py`; this runs the RL
algorithm the `ppo` section names (InstructGPT's PPO-ptx by default), the same without ptx for
the ablation, and evaluates both against the task's hidden gold reward.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import jax

from rlhf_jax.config import Config
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.checks import require_language_model
from rlhf_jax.loops.foundation import build_foundation
from rlhf_jax.loops.foundation_runs import evaluate_policy, run_rl
from rlhf_jax.loops.report import plot_curves, training_summary, write_json, write_markdown
from rlhf_jax.loops.rlvr import run_rlvr
from rlhf_jax.loops.stages import lm_loss
from rlhf_jax.loops.usage import refuse_unread
from rlhf_jax.models import save_hf
from rlhf_jax.steps import RLAlgorithm
from rlhf_jax.tasks import VERIFIABLE


def machine() -> dict[str, str]:
    return {
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "platform": platform.platform(),
        "jax": jax.__version__,
    }


def run_pipeline(
    cfg: Config, out_dir: str | Path, command: str = "", *, algo: RLAlgorithm | None = None
) -> dict:
    """Run every stage, write checkpoints, metrics, report.json/.md and curves.png. A
    verifiable-reward task (`task.name: sums`) runs `loops/rlvr.py` instead: no reward model,
    RL on `ppo.reward_fn`, a report of exact accuracies. `algo`: the RLAlgorithm of `cfg.ppo`
    when the caller resolved the config's parts already (the CLI), else resolved once here."""
    if cfg.model.path is not None:
        require_language_model(cfg.model.path, "model.path")
    refuse_unread(cfg, "pipeline")
    if cfg.task.name in VERIFIABLE:  # no reward model: RL on the task's reward function
        return run_rlvr(cfg, out_dir, command, machine(), algo=algo)
    t_start = time.time()
    f = build_foundation(cfg, out_dir, algo=algo, own_rows=True)  # only its own stages
    out, model_cfg = f.out, f.model_cfg

    # Step 3: RL (PPO-ptx by default), and the same run without ptx for the ablation.
    policy_params, state = run_rl(cfg, f, "ppo", adapter_dir=out / "policy_adapter", algo=f.algo)
    save_hf(model_cfg, policy_params, out / "policy", f.tokenizer)

    # Evaluation on held-out prompts.
    sft_eval = evaluate_policy(cfg, f, f.sft_params)
    ppo_eval = evaluate_policy(cfg, f, policy_params)
    kl = ev.kl_to_reference(
        model_cfg,
        policy_params,
        f.sft_params,
        ppo_eval.samples,
        cfg.eval.temperature,
        128,
        f.runtime,
    )
    boot = cfg.eval.bootstrap
    report = {
        "sft": {
            "gold_reward": float(sft_eval.gold.mean()),
            "gold_reward_ci": ev.bootstrap_mean_ci(sft_eval.per_prompt, boot, cfg.seed),
        },
        "ppo": {
            **ev.compare_to_reference(ppo_eval, sft_eval, kl, boot, cfg.seed),
            "final_beta": float(state.beta),
        },
        "rm": {
            "heldout_accuracy": f.rm_heldout["accuracy"],
            "heldout_margin": f.rm_heldout["margin"],
            "heldout_pairs": f.rm_heldout["pairs"],
            "bias_shift": f.rm_bias_shift,
        },
        "pretrain_loss": {
            "sft": lm_loss(model_cfg, f.sft_params, f.heldout_arrays, 32, f.runtime),
            "ppo": lm_loss(model_cfg, policy_params, f.heldout_arrays, 32, f.runtime),
        },
        "samples": [
            {"prompt": p, "sft": a, "ppo": b}
            for p, a, b in list(zip(f.eval_prompts, sft_eval.texts, ppo_eval.texts))[:8]
        ],
        "data_summary": [r.summary() for r in f.reports] + f.notes,
        "data": [r.to_dict() for r in f.reports],
    }
    if cfg.ptx.coef > 0 and cfg.eval.ptx_ablation:
        no_ptx_cfg = dataclasses.replace(cfg, ptx=dataclasses.replace(cfg.ptx, coef=0.0))
        ab_params, _ = run_rl(no_ptx_cfg, f, "ppo_no_ptx", ptx=False, algo=f.algo)
        ab_eval = evaluate_policy(cfg, f, ab_params)
        report["ablation"] = {
            "no_ptx": {
                "pretrain_loss": lm_loss(model_cfg, ab_params, f.heldout_arrays, 32, f.runtime),
                "gold_reward": float(ab_eval.gold.mean()),
            }
        }
    report["training"] = training_summary(f.logger)
    report["wall_seconds"] = time.time() - t_start
    report["machine"] = machine()
    write_json(out / "report.json", report)
    plot_curves(f.logger.history, out / "curves.png")
    write_markdown(out / "report.md", report, command)
    f.logger.close()
    return report
