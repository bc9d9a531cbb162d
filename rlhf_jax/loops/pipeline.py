"""The whole InstructGPT pipeline on one config: data -> (pretrain) -> SFT -> RM -> PPO-ptx -> eval.

With `model.path` unset it runs the built-in "topics" task end to end: a random base model is
pretrained on the task's text, and a hidden gold reward (the labelers' judgement) scores the
result. Every data file, generated or the user's, goes through the same validating loaders
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from rlhf_jax.config import Config, to_dict
from rlhf_jax.data import (
    PromptExample,
    encode_prompts,
    encode_rankings,
    encode_sft,
    encode_texts,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
    special_ids,
)
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.logging import MetricsLogger, prepare_output_dir
from rlhf_jax.loops.report import plot_curves, training_summary, write_json, write_markdown
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.stages import (
    PPOModels,
    init_random_model,
    lm_loss,
    reward_accuracy,
    score_all,
    train_lm,
    train_ppo,
    train_reward_model,
)
from rlhf_jax.models import load_hf, load_tokenizer, save_hf, save_scalar_model
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.steps import normalize_reward_bias
from rlhf_jax.tasks import topics
from rlhf_jax.tasks.tokenizer import train_tokenizer

STAGE_KEYS = ("init", "pretrain", "sft", "rm_sample", "rm", "ppo", "eval")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _lm_arrays(encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pretraining text as an LM batch: every real token is a target."""
    return {**encoded, "loss_mask": encoded["attention_mask"].astype(np.float32)}


def _sample_rankings(cfg, model_cfg, sft_params, tokenizer, prompt_rows, key, eos, pad):
    """Built-in task: K samples per prompt from the SFT policy, ranked by simulated labelers."""
    prompts = [r["prompt"] for r in prompt_rows]
    examples = [PromptExample(prompt=p) for p in prompts]
    enc = encode_prompts(examples, tokenizer, cfg.rm.max_prompt_len)
    ids = np.repeat(enc["input_ids"], cfg.rm.k, axis=0)
    mask = np.repeat(enc["attention_mask"], cfg.rm.k, axis=0)
    samples = ev.sample_responses(
        model_cfg,
        sft_params,
        ids,
        mask,
        key,
        cfg.rm.max_completion_len,
        1.0,
        eos,
        pad,
        batch_size=256,
    )
    texts = ev.decode_responses(tokenizer, samples)
    rng = np.random.default_rng(cfg.seed + 11)
    rows, unranked = [], 0
    for i, prompt in enumerate(prompts):
        completions = texts[i * cfg.rm.k : (i + 1) * cfg.rm.k]
        # Labelers cannot rank two identical texts differently; keep distinct ones only.
        distinct = list(dict.fromkeys(c for c in completions if c.strip()))
        if len(distinct) < 2:
            unranked += 1
            continue
        ranking = topics.rank_by_labelers(rng, prompt, distinct, cfg.task.labeler_noise)
        rows.append({"prompt": prompt, "completions": distinct, "ranking": ranking})
    return rows, unranked


def _split(arrays: dict[str, np.ndarray], fraction: float, seed: int):
    n = arrays["input_ids"].shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * fraction)))
    held, train = order[:n_held], order[n_held:]
    return ({k: v[train] for k, v in arrays.items()}, {k: v[held] for k, v in arrays.items()})


def run_pipeline(cfg: Config, out_dir: str | Path, command: str = "") -> dict:
    """Run every stage, write checkpoints, metrics, report.json/.md and curves.png."""
    t_start = time.time()
    out = prepare_output_dir(out_dir)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    logger = MetricsLogger(out, cfg.log.tensorboard, cfg.log.progress)
    runtime = Runtime.from_config(cfg)
    keys = dict(zip(STAGE_KEYS, jax.random.split(jax.random.key(cfg.seed), len(STAGE_KEYS))))
    builtin = cfg.model.path is None

    # Data: generate the built-in task's files, then load and validate everything up front.
    t = cfg.task
    task = topics.generate_task(
        cfg.seed, t.n_pretrain_texts, t.n_demonstrations, t.n_rm_prompts, t.n_eval_prompts
    )
    data_dir = out / "data"
    sft_path = cfg.sft.data or _write_jsonl(data_dir / "sft.jsonl", task.sft)
    prompts_path = cfg.ppo.prompts or _write_jsonl(data_dir / "ppo_prompts.jsonl", task.ppo_prompts)
    ptx_path = cfg.ptx.data or _write_jsonl(data_dir / "pretrain.jsonl", task.pretrain)
    heldout_path = _write_jsonl(data_dir / "pretrain_heldout.jsonl", task.pretrain_heldout)
    eval_path = _write_jsonl(data_dir / "eval_prompts.jsonl", task.eval_prompts)
    on_error = cfg.data.on_error
    sft_examples, sft_report = load_sft(sft_path, on_error)
    prompt_examples, prompt_report = load_prompts(prompts_path, on_error)
    ptx_examples, ptx_report = load_texts(ptx_path, on_error)
    heldout_examples, _ = load_texts(heldout_path)
    eval_examples, _ = load_prompts(eval_path)
    user_rankings = load_rankings(cfg.rm.data, on_error, cfg.rm.allow_ties) if cfg.rm.data else None

    if builtin:
        texts = [e.text for e in ptx_examples] + [e.prompt + e.completion for e in sft_examples]
        tokenizer = train_tokenizer(texts, t.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.model.path)
    eos_id, pad = special_ids(tokenizer)
    eos = (eos_id,)
    reports = [sft_report, prompt_report, ptx_report]
    sft_arrays = encode_sft(sft_examples, tokenizer, cfg.sft.max_len, sft_report, pack=cfg.sft.pack)
    # One demonstration per row, for the RM bias normalisation (reward at each row's end).
    demo_arrays = (
        encode_sft(sft_examples, tokenizer, cfg.sft.max_len) if cfg.sft.pack else sft_arrays
    )
    prompt_arrays = encode_prompts(
        prompt_examples, tokenizer, cfg.ppo.max_prompt_len, prompt_report
    )
    eval_arrays = encode_prompts(eval_examples, tokenizer, cfg.ppo.max_prompt_len)
    ptx_arrays = _lm_arrays(encode_texts(ptx_examples, tokenizer, cfg.ptx.max_len, ptx_report))
    heldout_arrays = _lm_arrays(encode_texts(heldout_examples, tokenizer, cfg.ptx.max_len))

    # Base model.
    if builtin:
        model_cfg, params = init_random_model(cfg.model, tokenizer, keys["init"], runtime)
        pre = cfg.pretrain
        pre_arrays = _lm_arrays(encode_texts(ptx_examples, tokenizer, pre.max_len))
        params = train_lm(
            "pretrain",
            model_cfg,
            params,
            pre_arrays,
            pre.steps,
            pre.batch_size,
            pre.optim,
            "default",
            {},
            keys["pretrain"],
            cfg.seed,
            logger,
            cfg.log.every,
            runtime,
            StageCheckpoints(out, "pretrain", cfg.checkpoint),
        )
    else:
        model_cfg = read_hf_config(cfg.model.path)
        model_cfg, params = load_hf(
            cfg.model.path,
            dtype=cfg.model.param_dtype,
            compute_dtype=cfg.model.dtype,
            shardings=runtime.param_shardings(model_cfg),
        )
    model_cfg = model_cfg.replace(remat=cfg.model.remat)

    # Step 1: SFT.
    s = cfg.sft
    sft_params = train_lm(
        "sft",
        model_cfg,
        params,
        sft_arrays,
        s.steps,
        s.batch_size,
        s.optim,
        s.loss,
        s.loss_kwargs,
        keys["sft"],
        cfg.seed,
        logger,
        cfg.log.every,
        runtime,
        StageCheckpoints(out, "sft", cfg.checkpoint),
    )
    save_hf(model_cfg, sft_params, out / "sft", tokenizer)

    # Step 2: reward model on rankings (sampled from SFT and ranked, for the built-in task).
    notes = []
    if user_rankings is None:
        rows, unranked = _sample_rankings(
            cfg, model_cfg, sft_params, tokenizer, task.rm_prompts, keys["rm_sample"], eos, pad
        )
        rankings, rank_report = load_rankings(_write_jsonl(data_dir / "rankings.jsonl", rows))
        if unranked:
            notes.append(f"{unranked} RM prompts not ranked: fewer than 2 distinct samples")
    else:
        rankings, rank_report = user_rankings
    reports.append(rank_report)
    rank_arrays = encode_rankings(
        rankings, tokenizer, cfg.rm.max_prompt_len, cfg.rm.max_completion_len, report=rank_report
    )
    rm_train, rm_held = _split(rank_arrays, cfg.rm.heldout_fraction, cfg.seed)
    rm_params = train_reward_model(
        cfg,
        model_cfg,
        sft_params,
        rm_train,
        keys["rm"],
        logger,
        runtime,
        StageCheckpoints(out, "rm", cfg.checkpoint),
    )
    held = reward_accuracy(cfg, model_cfg, rm_params, rm_held)
    demo_scores = score_all(model_cfg, rm_params, demo_arrays)
    rm_params = normalize_reward_bias(rm_params, demo_scores)
    save_scalar_model(model_cfg, rm_params, out / "rm", tokenizer)

    # Step 3: PPO-ptx (and the same run without ptx, for the ablation).
    models = PPOModels(model_cfg, sft_params, model_cfg, rm_params)
    state = train_ppo(
        cfg,
        models,
        prompt_arrays,
        ptx_arrays,
        eos,
        pad,
        keys["ppo"],
        logger,
        runtime,
        checkpoints=StageCheckpoints(out, "ppo", cfg.checkpoint),
    )
    policy_params = state.ema_params if state.ema_params is not None else state.policy.params
    save_hf(model_cfg, policy_params, out / "policy", tokenizer)

    # Evaluation on held-out prompts.
    def evaluate_policy(params, key):
        samples = ev.sample_responses(
            model_cfg,
            params,
            eval_arrays["input_ids"],
            eval_arrays["attention_mask"],
            key,
            cfg.ppo.max_new_tokens,
            cfg.eval.temperature,
            eos,
            pad,
            batch_size=128,
        )
        texts = ev.decode_responses(tokenizer, samples)
        gold = np.array([topics.gold_reward(e.prompt, c) for e, c in zip(eval_examples, texts)])
        return samples, texts, gold

    sft_samples, sft_texts, sft_gold = evaluate_policy(sft_params, keys["eval"])
    ppo_samples, ppo_texts, ppo_gold = evaluate_policy(policy_params, keys["eval"])
    kl = ev.kl_to_reference(
        model_cfg, policy_params, sft_params, ppo_samples, cfg.eval.temperature, 128
    )
    boot = cfg.eval.bootstrap
    report = {
        "sft": {
            "gold_reward": float(sft_gold.mean()),
            "gold_reward_ci": ev.bootstrap_mean_ci(sft_gold, boot, cfg.seed),
        },
        "ppo": {
            "gold_reward": float(ppo_gold.mean()),
            "gold_reward_ci": ev.bootstrap_mean_ci(ppo_gold, boot, cfg.seed),
            "gold_gain": float((ppo_gold - sft_gold).mean()),
            "gold_gain_ci": ev.bootstrap_mean_ci(ppo_gold - sft_gold, boot, cfg.seed),
            "win_rate_vs_sft": ev.win_rate(ppo_gold, sft_gold),
            "kl_to_sft": float(kl.mean()),
            "final_beta": float(state.beta),
        },
        "rm": {
            "heldout_accuracy": held["accuracy"],
            "heldout_margin": held["margin"],
            "heldout_pairs": held["pairs"],
            "bias_shift": float(demo_scores.mean()),
        },
        "pretrain_loss": {
            "sft": lm_loss(model_cfg, sft_params, heldout_arrays, 32),
            "ppo": lm_loss(model_cfg, policy_params, heldout_arrays, 32),
        },
        "samples": [
            {"prompt": e.prompt, "sft": a, "ppo": b}
            for e, a, b in list(zip(eval_examples, sft_texts, ppo_texts))[:8]
        ],
        "data_summary": [r.summary() for r in reports] + notes,
        "data": [r.to_dict() for r in reports],
    }
    if cfg.ptx.coef > 0 and cfg.eval.ptx_ablation:
        no_ptx_cfg = dataclasses.replace(cfg, ptx=dataclasses.replace(cfg.ptx, coef=0.0))
        ab_state = train_ppo(
            no_ptx_cfg,
            models,
            prompt_arrays,
            None,
            eos,
            pad,
            keys["ppo"],
            logger,
            runtime,
            stage="ppo_no_ptx",
            checkpoints=StageCheckpoints(out, "ppo_no_ptx", cfg.checkpoint),
        )
        ab_params = (
            ab_state.ema_params if ab_state.ema_params is not None else ab_state.policy.params
        )
        _, _, ab_gold = evaluate_policy(ab_params, keys["eval"])
        report["ablation"] = {
            "no_ptx": {
                "pretrain_loss": lm_loss(model_cfg, ab_params, heldout_arrays, 32),
                "gold_reward": float(ab_gold.mean()),
            }
        }
    report["training"] = training_summary(logger)
    report["wall_seconds"] = time.time() - t_start
    report["machine"] = {
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "platform": platform.platform(),
        "jax": jax.__version__,
    }
    write_json(out / "report.json", report)
    plot_curves(logger.history, out / "curves.png")
    write_markdown(out / "report.md", report, command)
    logger.close()
    return report
