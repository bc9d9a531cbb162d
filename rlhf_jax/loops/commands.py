"""`rlhf-jax sft | rm | ppo | dpo`: one stage of the pipeline on your checkpoints and data.

Each reads checkpoint folders and JSONL files named in the config, validates all data before
compiling anything, trains, and writes a Hugging Face folder into the output folder (a reward
model as a transformers sequence-classification model).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.config import Config
from rlhf_jax.data import (
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
    special_ids,
)
from rlhf_jax.data.shard import HeldRows, all_rows
from rlhf_jax.errors import RlhfJaxError
from rlhf_jax.loops.build_supervised import sft_spec, stage_batches
from rlhf_jax.loops.checks import (
    check_positions,
    check_reward_model_fits,
    check_reward_reading,
    check_rows,
    check_token_ids,
    check_tokenizer,
    require_language_model,
    stage_lengths,
)
from rlhf_jax.loops.encoding import RunEncoder
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.preference import (
    heldout_kl,
    preference_metrics,
    train_preference,
    with_reference_logps,
)
from rlhf_jax.loops.process_rows import (
    encode_own_rows,
    encode_share,
    splits_rows,
    stage_rankings,
)
from rlhf_jax.loops.report import training_summary
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.rl import RLModels, final_policy, rl_batches, train_rl
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.settings import stage_settings
from rlhf_jax.loops.setup import load_model, shift_reward_bias, start_run, stop_ids
from rlhf_jax.loops.stages import (
    reward_accuracy,
    train_reward_model,
    train_supervised,
)
from rlhf_jax.loops.train import StageRun
from rlhf_jax.models import (
    load_scalar_model,
    load_tokenizer,
    save_hf,
    save_scalar_model,
)
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.steps import RLAlgorithm, check_reward_fns, resolve_config_parts


def _require(value: str | None, key: str, command: str) -> str:
    if value is None:
        raise RlhfJaxError(f"`rlhf-jax {command}` needs config key '{key}' (a path)")
    return value


# Sections that shape every stage command's training (each adds its own).
STAGE_SECTIONS = ("seed", "model", "data")


# The model folders each command reads (config key -> path) and the subfolder it writes.
def _inputs(cfg: Config) -> dict[str, str | None]:
    return {
        "model.path": cfg.model.path,
        "rm.init": cfg.rm.init,
        "ppo.policy": cfg.ppo.policy,
        "ppo.reward_model": cfg.ppo.reward_model,
        "dpo.policy": cfg.dpo.policy,
    }


def _start(
    cfg: Config, out_dir: str | Path, writes: str, algo: RLAlgorithm | None
) -> tuple[Path, MetricsLogger, Runtime]:
    return start_run(cfg, out_dir, _inputs(cfg), (writes, f"{writes}_adapter"), algo)


def _stage_run(
    cfg: Config,
    out: Path,
    logger: MetricsLogger,
    runtime: Runtime,
    stage: str,
    inputs: dict,
    **saved: Any,
) -> StageRun:
    """A standalone command's one stage: keyed by `cfg.seed`, checkpointed in OUT under
    `stage` with the settings that must match to resume (the stage's sections and its input
    paths `inputs`); `saved`: where LoRA adapters go and the base model they name."""
    settings = stage_settings(cfg, STAGE_SECTIONS + (stage,), inputs)
    return StageRun(
        key=jax.random.key(cfg.seed),
        logger=logger,
        runtime=runtime,
        checkpoints=StageCheckpoints(out, stage, cfg.checkpoint, settings),
        **saved,
    )


def _finish(out: Path, logger: MetricsLogger, reports: list, extra: dict | None = None) -> None:
    """Write OUT/summary.json (data kept/skipped/truncated per file, skipped updates,
    warnings) and print its one-line data summaries."""
    summary = {"data": [r.to_dict() for r in reports], **training_summary(logger), **(extra or {})}
    logger.close()
    if jax.process_index() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in reports:
        print(r.summary())
    for key, value in (extra or {}).items():
        print(f"{key.replace('_', ' ')}: {value:.3f}")


def _check_fit(path: str, tokenizer, arrays: dict[str, dict], lengths: dict[str, int]) -> None:
    """The tokenizer, the data's token ids and the stage's sequence lengths against the model
    at `path` (its config.json only): before the output folder, the weights or any compile."""
    model_cfg = read_hf_config(path)
    check_tokenizer(model_cfg, path, tokenizer)
    eos, pad = special_ids(tokenizer)
    check_token_ids(model_cfg, path, arrays, {"EOS": eos, "pad": pad})
    check_positions(model_cfg, path, lengths)


def _held(arrays: dict | HeldRows) -> dict:
    """The encoded arrays of the rows held here (every row, or this process's)."""
    return arrays.arrays if isinstance(arrays, HeldRows) else arrays


def run_sft(cfg: Config, out_dir: str | Path, *, algo: RLAlgorithm | None = None) -> Path:
    """Fine-tune `model.path` on `sft.data`; writes OUT/sft."""
    model_path = require_language_model(_require(cfg.model.path, "model.path", "sft"), "model.path")
    data = _require(cfg.sft.data, "sft.data", "sft")
    examples, report = load_sft(data, cfg.data.on_error)
    tokenizer = load_tokenizer(model_path)
    encode = RunEncoder(cfg, tokenizer)
    # Packed rows hold several demonstrations: which a process reads is known only once packed.
    if splits_rows(cfg) and not cfg.sft.pack:
        own = Runtime.from_config(cfg)
        arrays = encode_own_rows(examples, encode.sft, report, stage_batches(cfg, "sft"), own)
    else:
        arrays = encode.sft(examples, report, pack=cfg.sft.pack)
    checked = {f"sft.data {data}": _held(arrays)}
    _check_fit(model_path, tokenizer, checked, stage_lengths(cfg, ("sft",)))
    check_rows(all_rows(arrays), cfg.sft.batch_size, "sft.batch_size", f"sft.data {data}")
    out, logger, runtime = _start(cfg, out_dir, "sft", algo)
    model_cfg, params = load_model(model_path, cfg, runtime)
    params = train_supervised(
        sft_spec(cfg, model_cfg),
        params,
        arrays,
        _stage_run(
            cfg,
            out,
            logger,
            runtime,
            "sft",
            {"model.path": model_path, "sft.data": data},
            adapter_dir=out / "sft_adapter",
            base_model=model_path,
        ),
    )
    _finish(out, logger, [report])
    return save_hf(model_cfg, params, out / "sft", tokenizer)


def run_rm(cfg: Config, out_dir: str | Path, *, algo: RLAlgorithm | None = None) -> Path:
    """Reward model from `rm.init` (or `model.path`) on `rm.data`; writes OUT/rm."""
    init_key = "rm.init" if cfg.rm.init else "model.path"
    init = require_language_model(
        cfg.rm.init or _require(cfg.model.path, "rm.init", "rm"), init_key
    )
    data = _require(cfg.rm.data, "rm.data", "rm")
    rankings, report = load_rankings(data, cfg.data.on_error, cfg.rm.allow_ties)
    reports = [report]
    demo_arrays = None
    if cfg.sft.data:  # demonstrations for the bias (below), read and checked before training
        demos, demo_report = load_sft(cfg.sft.data, cfg.data.on_error)
        reports.append(demo_report)
    tokenizer = load_tokenizer(init)
    encode = RunEncoder(cfg, tokenizer)
    # rm.heldout_fraction of the prompts (as in the pipeline) scores the trained model only
    train, held = stage_rankings(cfg, rankings, encode, report, "rm")
    checked = {f"rm.data {data}": _held(train)}
    if held is not None:
        checked[f"rm.data {data} (held out)"] = held
    if cfg.sft.data:
        if splits_rows(cfg):
            demo_arrays = encode_share(demos, encode.sft, demo_report, Runtime.from_config(cfg))
        else:
            demo_arrays = encode.sft(demos, demo_report)
        checked[f"sft.data {cfg.sft.data}"] = _held(demo_arrays)
    lengths = stage_lengths(cfg, ("rm", "sft") if cfg.sft.data else ("rm",))
    _check_fit(init, tokenizer, checked, lengths)
    what = f"rm.data {data}" + (f" (less {len(held['input_ids'])} held out)" if held else "")
    check_rows(all_rows(train), cfg.rm.batch_size, "rm.batch_size", what)
    out, logger, runtime = _start(cfg, out_dir, "rm", algo)
    model_cfg, trunk = load_model(init, cfg, runtime)
    # The reward is read at the last token that is not this pad id (transformers' rule), and
    # the saved config.json names it, so transformers reads the token trained here.
    model_cfg = model_cfg.replace(pad_token_id=special_ids(tokenizer)[1])
    trained = train_reward_model(
        cfg,
        model_cfg,
        trunk,
        train,
        _stage_run(cfg, out, logger, runtime, "rm", {"rm.init": init, "rm.data": data}),
    )
    params = trained
    if demo_arrays is not None:  # InstructGPT: shift the bias so demonstrations score 0
        params, _ = shift_reward_bias(model_cfg, trained, demo_arrays, runtime)
    else:
        logger.warn(
            "rm: no sft.data given, so the reward model's bias was not shifted to make the "
            "demonstrations score 0 on average (InstructGPT's normalisation); scores keep "
            "their trained offset"
        )
    # Saved before anything is read back from the loss's metrics: nothing after training
    # can lose the trained model.
    folder = save_scalar_model(model_cfg, params, out / "rm", tokenizer)
    # (the bias shift changes no pair's order, so the accuracies are taken on `trained`)
    accuracy = functools.partial(reward_accuracy, cfg, model_cfg, trained, runtime=runtime)
    extra = {"train_pairwise_accuracy": accuracy(train)["accuracy"]}
    if held is not None:
        extra["heldout_pairwise_accuracy"] = accuracy(held)["accuracy"]
    _finish(out, logger, reports, extra)
    return folder


def _rl_data(cfg: Config, policy_path: str, rm_path: str | None):
    """`(tokenizer, (prompt arrays, prompt texts), ptx arrays or None, reports)` of `rlhf-jax
    ppo`, every file checked against the policy (and the RM's position table) and every reward
    function called once on the prompts, before anything loads. With several processes each
    encodes only the rows it reads (`HeldRows`, see loops/process_rows.py)."""
    prompts, prompt_report = load_prompts(
        _require(cfg.ppo.prompts, "ppo.prompts", "ppo"), cfg.data.on_error
    )
    tokenizer = load_tokenizer(policy_path)
    encode = RunEncoder(cfg, tokenizer)
    own = Runtime.from_config(cfg) if splits_rows(cfg) else None
    spec = rl_batches(cfg)
    if own is None:
        prompt_arrays, prompt_texts = encode.rl_prompts(prompts, prompt_report)
    else:  # under data.on_error=raise every row is kept: the texts are the file's rows
        prompt_arrays = encode_own_rows(
            prompts, encode.prompts, prompt_report, spec["prompts"], own
        )
        prompt_texts = [e.text() for e in prompts]
    checked = {f"ppo.prompts {cfg.ppo.prompts}": prompt_arrays}
    rows = [(prompt_arrays, cfg.ppo.rollout_batch, "ppo.rollout_batch", "ppo.prompts")]
    ptx_arrays, reports = None, [prompt_report]
    if cfg.ptx.coef > 0:
        ptx_data = _require(cfg.ptx.data, "ptx.data", "ppo")
        ptx_examples, ptx_report = load_texts(ptx_data, cfg.data.on_error)

        def encode_ptx(examples, report):
            return encode.lm_texts(examples, cfg.ptx.max_len, report)

        if own is None:
            ptx_arrays = encode_ptx(ptx_examples, ptx_report)
        else:
            ptx_arrays = encode_own_rows(ptx_examples, encode_ptx, ptx_report, spec["ptx"], own)
        checked[f"ptx.data {ptx_data}"] = ptx_arrays
        rows.append((ptx_arrays, cfg.ptx.batch_size, "ptx.batch_size", "ptx.data"))
        reports.append(ptx_report)
    lengths = stage_lengths(cfg, ("ppo",))
    checked = {k: v.arrays if isinstance(v, HeldRows) else v for k, v in checked.items()}
    _check_fit(policy_path, tokenizer, checked, lengths)
    for arrays, batch_size, batch_key, file_key in rows:
        what = f"{file_key} {cfg.ppo.prompts if file_key == 'ppo.prompts' else cfg.ptx.data}"
        check_rows(all_rows(arrays), batch_size, batch_key, what)
    if rm_path is not None:  # the RM reads the whole prompt + response, in the policy's ids
        rm_cfg = read_hf_config(rm_path)
        rm_tok = load_tokenizer(rm_path)
        check_reward_model_fits(
            policy_path, read_hf_config(policy_path), tokenizer, rm_path, rm_cfg, rm_tok
        )
        check_reward_reading(rm_path, rm_cfg, rm_tok)
        check_positions(rm_cfg, rm_path, lengths)
    check_reward_fns(cfg, prompt_texts)
    return tokenizer, (prompt_arrays, prompt_texts), ptx_arrays, reports


def _rl_models(
    cfg: Config, policy_path: str, rm_path: str | None, runtime: Runtime, pad: int
) -> RLModels:
    policy_cfg, sft_params = load_model(policy_path, cfg, runtime)
    if rm_path is None:
        return RLModels(policy_cfg, sft_params)
    # Straight into its shards: an 8B reward model never sits whole on one device.
    reward_cfg, reward_params = load_scalar_model(
        rm_path,
        dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.dtype,
        shardings=lambda c: runtime.param_shardings(c, scalar=True),
    )
    # model.remat as for every loaded model: the critic starts as this model and trains. The
    # reward is read at the last token that is not the pad id (checked in `_rl_data`).
    reward_cfg = reward_cfg.replace(
        remat=cfg.model.remat, attention=cfg.model.attention, pad_token_id=pad
    )
    return RLModels(policy_cfg, sft_params, reward_cfg, reward_params)


def run_ppo(cfg: Config, out_dir: str | Path, *, algo: RLAlgorithm | None = None) -> Path:
    """RL from `ppo.policy` against `ppo.reward_model` (or `ppo.reward_fn`); writes
    OUT/policy. The algorithm is the one the `ppo` section names (PPO by default)."""
    algo = algo if algo is not None else resolve_config_parts(cfg)
    policy_path = require_language_model(
        _require(cfg.ppo.policy, "ppo.policy", "ppo"), "ppo.policy"
    )
    rm_path = None
    if algo.reward_fn is None:
        rm_path = _require(cfg.ppo.reward_model, "ppo.reward_model (or ppo.reward_fn)", "ppo")
    tokenizer, (prompt_arrays, prompt_texts), ptx_arrays, reports = _rl_data(
        cfg, policy_path, rm_path
    )
    out, logger, runtime = _start(cfg, out_dir, "policy", algo)
    eos, pad = stop_ids(tokenizer)
    models = _rl_models(cfg, policy_path, rm_path, runtime, pad)
    settings = stage_settings(
        cfg,
        STAGE_SECTIONS + ("ppo", "ptx"),
        {
            "ppo.policy": policy_path,
            "ppo.reward_model": rm_path,
            "ppo.prompts": cfg.ppo.prompts,
            "ptx.data": cfg.ptx.data if cfg.ptx.coef > 0 else None,
        },
    )
    state = train_rl(
        cfg,
        models,
        prompt_arrays,
        ptx_arrays,
        eos,
        pad,
        jax.random.key(cfg.seed),
        logger,
        runtime=runtime,
        checkpoints=StageCheckpoints(out, "ppo", cfg.checkpoint, settings),
        tokenizer=tokenizer,
        prompt_texts=prompt_texts,
        algo=algo,
    )
    _finish(out, logger, reports)
    params = final_policy(cfg, models, state, out / "policy_adapter", policy_path)
    return save_hf(models.policy_cfg, params, out / "policy", tokenizer)


def run_dpo(cfg: Config, out_dir: str | Path, *, algo: RLAlgorithm | None = None) -> Path:
    """DPO (or the `dpo.loss` variant) from `dpo.policy` on the rankings of `dpo.data` (or
    `rm.data`); writes OUT/policy."""
    policy_path = require_language_model(
        _require(cfg.dpo.policy, "dpo.policy", "dpo"), "dpo.policy"
    )
    data_key = "dpo.data" if cfg.dpo.data else "rm.data"
    data = _require(cfg.dpo.data or cfg.rm.data, "dpo.data (or rm.data)", "dpo")
    rankings, report = load_rankings(data, cfg.data.on_error, cfg.dpo.allow_ties)
    tokenizer = load_tokenizer(policy_path)
    train, held = stage_rankings(cfg, rankings, RunEncoder(cfg, tokenizer), report, "dpo")
    checked = {f"{data_key} {data}": _held(train)}
    if held is not None:
        checked[f"{data_key} {data} (held out)"] = held
    _check_fit(policy_path, tokenizer, checked, stage_lengths(cfg, ("dpo",)))
    what = f"{data_key} {data}" + (f" (less {len(held['rank'])} held out)" if held else "")
    check_rows(all_rows(train), cfg.dpo.batch_size, "dpo.batch_size", what)
    out, logger, runtime = _start(cfg, out_dir, "policy", algo)
    model_cfg, ref_params = load_model(policy_path, cfg, runtime)
    bs = cfg.dpo.batch_size
    train = with_reference_logps(model_cfg, ref_params, train, bs, runtime)
    key = jax.random.key(cfg.seed)
    params = train_preference(
        cfg,
        model_cfg,
        ref_params,
        train,
        _stage_run(
            cfg,
            out,
            logger,
            runtime,
            "dpo",
            {"dpo.policy": policy_path, data_key: data},
            adapter_dir=out / "policy_adapter",
            base_model=policy_path,
        ),
    )
    # Saved before anything is read back from the loss's metrics: nothing after training
    # can lose the trained policy.
    folder = save_hf(model_cfg, params, out / "policy", tokenizer)
    metrics = functools.partial(preference_metrics, cfg, model_cfg, params, runtime=runtime)
    extra = {"train_accuracy": metrics(train)["accuracy"]}
    if held is not None:
        held = with_reference_logps(model_cfg, ref_params, held, bs, runtime)
        extra["heldout_accuracy"] = metrics(held)["accuracy"]
        eos, pad = stop_ids(tokenizer)
        extra["heldout_kl_to_reference"] = heldout_kl(
            cfg, model_cfg, params, ref_params, held, jax.random.fold_in(key, 1), eos, pad,
            runtime=runtime,
        )  # fmt: skip
    _finish(out, logger, [report], extra)
    return folder
