"""What every RL run of the pipeline starts from: validated data, the base model, SFT and the
reward model. The pipeline (`run_pipeline`) runs one RL algorithm on it; `rlhf-jax compare`
runs several from the same foundation.

With `model.path` unset it builds the built-in "topics" task: a random base model pretrained
on the task's text, simulated labelers ranking SFT samples by a hidden gold reward. Every data
file, generated or the user's, goes through the same validating loaders before anything is
compiled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.config import Config, to_dict
from rlhf_jax.data import (
    PromptExample,
    heldout_rows,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
    special_ids,
    split_heldout,
)
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.checks import check_positions, check_rows, check_token_ids, stage_lengths
from rlhf_jax.loops.encoding import RunEncoder
from rlhf_jax.loops.logging import MetricsLogger, prepare_output_dir, write_run_config
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.settings import pipeline_settings
from rlhf_jax.loops.stages import (
    init_random_model,
    random_model_config,
    reward_accuracy,
    score_all,
    train_lm,
    train_reward_model,
)
from rlhf_jax.models import ModelConfig, load_hf, load_tokenizer, save_hf, save_scalar_model
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.steps import normalize_reward_bias, resolve_config_parts
from rlhf_jax.tasks import TASKS
from rlhf_jax.tasks.tokenizer import train_tokenizer

STAGE_KEYS = ("init", "pretrain", "sft", "rm_sample", "rm", "ppo", "eval")


@dataclasses.dataclass
class Foundation:
    """Everything the RL stage and the evaluation need, built once per output folder."""

    out: Path
    logger: MetricsLogger
    runtime: Runtime
    keys: dict[str, jax.Array]
    tokenizer: Any
    eos: tuple[int, ...]
    pad: int
    model_cfg: ModelConfig
    sft_params: Any
    rm_params: Any
    prompt_arrays: dict[str, np.ndarray]  # RL prompts
    ptx_arrays: dict[str, np.ndarray]  # pretraining text for PPO-ptx
    heldout_arrays: dict[str, np.ndarray]  # pretraining text never trained on
    eval_prompts: list[str]
    eval_arrays: dict[str, np.ndarray]
    rank_train: dict[str, np.ndarray]  # the rankings the RM (and offline DPO) trains on
    rank_heldout: dict[str, np.ndarray]  # the rankings held out of both
    rm_heldout: dict[str, float]  # held-out pairwise accuracy, margin, pairs
    rm_bias_shift: float
    reports: list = dataclasses.field(default_factory=list)  # DataReports of every file
    notes: list[str] = dataclasses.field(default_factory=list)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _sample_rankings(cfg, model_cfg, sft_params, tokenizer, prompt_rows, key, eos, pad):
    """Built-in task: K samples per prompt from the SFT policy, ranked by simulated labelers."""
    prompts = [r["prompt"] for r in prompt_rows]
    examples = [PromptExample(prompt=p) for p in prompts]
    enc = RunEncoder(cfg, tokenizer).prompts(examples, max_len=cfg.rm.max_prompt_len)
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
        ranking = TASKS[cfg.task.name].rank_by_labelers(
            rng, prompt, distinct, cfg.task.labeler_noise
        )
        rows.append({"prompt": prompt, "completions": distinct, "ranking": ranking})
    return rows, unranked


def _check_against_model(cfg: Config, model_cfg: ModelConfig, special, batches: dict) -> None:
    """Token ids, sequence lengths and rows per batch of every file, before any weight exists.
    batches: {config key of the file: (what to call it, arrays, batch-size key, batch size,
    rows set aside for evaluation)}."""
    name = cfg.model.path or "the built-in task's model (model.*)"
    arrays = {key: entry[1] for key, entry in batches.items()}
    check_token_ids(model_cfg, name, arrays, {"EOS": special[0], "pad": special[1]})
    check_positions(model_cfg, name, stage_lengths(cfg, ("sft", "rm", "ppo")))
    for key, (what, enc, batch_key, batch_size, held) in batches.items():
        check_rows(len(enc["input_ids"]) - held, batch_size, batch_key, f"{key} {what}")


def build_foundation(cfg: Config, out_dir: str | Path) -> Foundation:
    """Check every part the config names, write run_config.json, load and validate all data, then
    pretrain (built-in task), SFT (saved to OUT/sft) and the reward model (OUT/rm)."""
    resolve_config_parts(cfg)
    writes = ("sft", "rm", "policy", "data", *(f"policies/{n}" for n in cfg.compare.algorithms))
    out = prepare_output_dir(out_dir, {"model.path": cfg.model.path}, writes)
    write_run_config(out, to_dict(cfg))
    logger = MetricsLogger(out, cfg.log.tensorboard, cfg.log.progress)
    runtime = Runtime.from_config(cfg)
    keys = dict(zip(STAGE_KEYS, jax.random.split(jax.random.key(cfg.seed), len(STAGE_KEYS))))
    builtin = cfg.model.path is None

    # Data: generate the built-in task's files, then load and validate everything up front.
    t = cfg.task
    task = TASKS[t.name].generate_task(
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
    encode = RunEncoder(cfg, tokenizer)
    sft_arrays = encode.sft(sft_examples, sft_report, pack=cfg.sft.pack)
    # One demonstration per row, for the RM bias normalisation (reward at each row's end).
    demo_arrays = encode.sft(sft_examples) if cfg.sft.pack else sft_arrays
    prompt_arrays = encode.prompts(prompt_examples, prompt_report)
    eval_arrays = encode.prompts(eval_examples)
    ptx_arrays = encode.lm_texts(ptx_examples, cfg.ptx.max_len, ptx_report)
    heldout_arrays = encode.lm_texts(heldout_examples, cfg.ptx.max_len)
    user_rank_arrays = None
    if user_rankings is not None:  # the user's rankings are encoded (and checked) up front too
        user_rank_arrays = encode.rankings(*user_rankings)

    # Base model: its config first, to check the data against it before any weight is made.
    model_cfg = (
        random_model_config(cfg.model, tokenizer) if builtin else read_hf_config(cfg.model.path)
    )
    batches = {
        "sft.data": (sft_path, sft_arrays, "sft.batch_size", cfg.sft.batch_size, 0),
        "ppo.prompts": (prompts_path, prompt_arrays, "ppo.rollout_batch", cfg.ppo.rollout_batch, 0),
    }
    if cfg.ptx.coef > 0:
        batches["ptx.data"] = (ptx_path, ptx_arrays, "ptx.batch_size", cfg.ptx.batch_size, 0)
    if user_rank_arrays is not None:  # held-out rankings are split off before training
        n_held = heldout_rows(user_rank_arrays, cfg.rm.heldout_fraction)
        what = f"{cfg.rm.data} (less {n_held} held out)"
        batches["rm.data"] = (what, user_rank_arrays, "rm.batch_size", cfg.rm.batch_size, n_held)
    _check_against_model(cfg, model_cfg, (eos_id, pad), batches)
    if builtin:
        model_cfg, params = init_random_model(cfg.model, tokenizer, keys["init"], runtime)
        pre = cfg.pretrain
        pre_arrays = encode.lm_texts(ptx_examples, pre.max_len)
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
            StageCheckpoints(out, "pretrain", cfg.checkpoint, pipeline_settings(cfg, "pretrain")),
        )
    else:
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
        StageCheckpoints(out, "sft", cfg.checkpoint, pipeline_settings(cfg, "sft")),
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
        rank_arrays = encode.rankings(rankings, rank_report)
    else:
        rank_report, rank_arrays = user_rankings[1], user_rank_arrays
    reports.append(rank_report)
    rm_train, rm_held = split_heldout(rank_arrays, cfg.rm.heldout_fraction, cfg.seed)
    rm_params = train_reward_model(
        cfg,
        model_cfg,
        sft_params,
        rm_train,
        keys["rm"],
        logger,
        runtime,
        StageCheckpoints(out, "rm", cfg.checkpoint, pipeline_settings(cfg, "rm")),
    )
    held = reward_accuracy(cfg, model_cfg, rm_params, rm_held)
    demo_scores = score_all(model_cfg, rm_params, demo_arrays)
    rm_params = normalize_reward_bias(rm_params, demo_scores)
    save_scalar_model(model_cfg, rm_params, out / "rm", tokenizer)
    return Foundation(
        out=out,
        logger=logger,
        runtime=runtime,
        keys=keys,
        tokenizer=tokenizer,
        eos=eos,
        pad=pad,
        model_cfg=model_cfg,
        sft_params=sft_params,
        rm_params=rm_params,
        prompt_arrays=prompt_arrays,
        ptx_arrays=ptx_arrays,
        heldout_arrays=heldout_arrays,
        eval_prompts=[e.prompt for e in eval_examples],
        eval_arrays=eval_arrays,
        rank_train=rm_train,
        rank_heldout=rm_held,
        rm_heldout=held,
        rm_bias_shift=float(demo_scores.mean()),
        reports=reports,
        notes=notes,
    )
