"""What every RL run of the pipeline starts from: validated data, the base model, SFT and the
reward model. The pipeline (`run_pipeline`) runs one RL algorithm on it; `rlhf-jax compare`
runs several from the same foundation.

With `model.path` unset it builds the built-in task (`task.name`): a random base model
pretrained on the task's text, and for "topics" simulated labelers ranking SFT samples by a
hidden gold reward ("sums", a verifiable-reward task, is built without a reward model). Every data
file, generated or the user's, goes through the same validating loaders before anything is
compiled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data import (
    DataReport,
    PromptExample,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
)
from rlhf_jax.data.shard import HeldRows, all_rows
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.build_supervised import pretrain_spec, sft_spec
from rlhf_jax.loops.checks import (
    check_positions,
    check_rows,
    check_token_ids,
    check_tokenizer,
    stage_lengths,
)
from rlhf_jax.loops.encoding import RunEncoder
from rlhf_jax.loops.foundation_rows import encode_shares
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.process_rows import OrderedShare, encode_ordered, splits_rows, stage_rankings
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.settings import pipeline_settings
from rlhf_jax.loops.setup import load_model, shift_reward_bias, start_run, stop_ids
from rlhf_jax.loops.shared_files import write_jsonl_once
from rlhf_jax.loops.stages import (
    init_random_model,
    random_model_config,
    reward_accuracy,
    train_reward_model,
    train_supervised,
)
from rlhf_jax.loops.train import StageRun
from rlhf_jax.models import ModelConfig, load_tokenizer, save_hf, save_scalar_model
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.steps import check_reward_fns, resolve_config_parts
from rlhf_jax.tasks import TASKS
from rlhf_jax.tasks.labeling import rank_samples
from rlhf_jax.tasks.tokenizer import train_tokenizer

STAGE_KEYS = ("init", "pretrain", "sft", "rm_sample", "rm", "ppo", "eval")


def stage_keys(seed: int) -> dict[str, jax.Array]:
    """Each stage's random key (`STAGE_KEYS`) from the run's seed: one split, so a stage's
    key does not change when another stage is added or skipped."""
    return dict(zip(STAGE_KEYS, jax.random.split(jax.random.key(seed), len(STAGE_KEYS))))


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
    # Arrays: every row, or with several processes (`own_rows`) only this process's
    # (`HeldRows`, `OrderedShare`: loops/foundation_rows.py).
    prompt_arrays: dict[str, np.ndarray] | HeldRows  # RL prompts
    prompt_texts: list[str]  # each RL prompt row as the data file wrote it (reward functions)
    ptx_arrays: dict[str, np.ndarray] | HeldRows | None  # pretraining text for PPO-ptx
    heldout_arrays: dict[str, np.ndarray] | HeldRows  # pretraining text never trained on
    eval_prompts: list[str]
    eval_arrays: dict[str, np.ndarray] | OrderedShare
    # The reward model and its rankings; None when built without one (a verifiable task).
    rm_params: Any = None
    rank_train: dict[str, np.ndarray] | HeldRows | None = None  # what the RM (and DPO) trains on
    rank_heldout: dict[str, np.ndarray] | None = None  # the rankings held out of both
    rm_heldout: dict[str, float] | None = None  # held-out pairwise accuracy, margin, pairs
    rm_bias_shift: float | None = None
    reports: list = dataclasses.field(default_factory=list)  # DataReports of every file
    notes: list[str] = dataclasses.field(default_factory=list)
    algo: Any = None  # the RLAlgorithm of cfg.ppo, resolved once when the run started


def _sample_rankings(cfg, model_cfg, sft_params, tokenizer, prompt_rows, key, special, split):
    """Built-in task: K samples per prompt from the SFT policy (on the run's mesh), ranked by
    simulated labelers. `split`: each process encodes and feeds only its slice of the
    sampling batches' prompts (the samples, gathered, are one process's). Only process 0,
    the one that writes the rankings file, decodes and ranks: others return no rows."""
    (eos, pad), runtime = special
    prompts = [r["prompt"] for r in prompt_rows]
    examples = [PromptExample(prompt=p) for p in prompts]
    k, batch = cfg.rm.k, 256

    def encode(rows, report=None):
        return RunEncoder(cfg, tokenizer).prompts(rows, report, max_len=cfg.rm.max_prompt_len)

    opts = dict(max_new_tokens=cfg.rm.max_completion_len, temperature=1.0, eos_ids=eos,
                pad_id=pad, batch_size=batch, runtime=runtime)  # fmt: skip
    if split:
        report = DataReport(path="the RM prompts")
        held = encode_ordered(examples, encode, report, batch, runtime, repeat=k)
        samples = ev.sample_responses(model_cfg, sft_params, None, None, key, held=held, **opts)
    else:
        enc = encode(examples)
        ids = np.repeat(enc["input_ids"], k, axis=0)
        mask = np.repeat(enc["attention_mask"], k, axis=0)
        samples = ev.sample_responses(model_cfg, sft_params, ids, mask, key, **opts)
    if jax.process_index() != 0:
        return []
    texts = ev.decode_responses(tokenizer, samples)
    per_prompt = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
    task = TASKS[cfg.task.name]
    return rank_samples(task, prompts, per_prompt, cfg.seed + 11, cfg.task.labeler_noise)[0]


def _check_against_model(
    cfg: Config, model_cfg: ModelConfig, tokenizer, special, batches: dict
) -> None:
    """The tokenizer, the token ids, sequence lengths and rows per batch of every file, before
    any weight exists.
    batches: {config key of the file: (what to call it, arrays, batch-size key, batch size,
    rows set aside for evaluation)}."""
    name = cfg.model.path or "the built-in task's model (model.*)"
    check_tokenizer(model_cfg, name, tokenizer)
    arrays = {key: _held(entry[1]) for key, entry in batches.items()}
    check_token_ids(model_cfg, name, arrays, {"EOS": special[0], "pad": special[1]})
    check_positions(model_cfg, name, stage_lengths(cfg, ("sft", "rm", "ppo")))
    for key, (what, enc, batch_key, batch_size, held) in batches.items():
        check_rows(all_rows(enc) - held, batch_size, batch_key, f"{key} {what}")


def _held(arrays: dict | HeldRows) -> dict:
    """The encoded arrays of the rows held here (every row, or this process's)."""
    return arrays.arrays if isinstance(arrays, HeldRows) else arrays


@dataclasses.dataclass
class _Data:
    """Every file of a run (the built-in task's generated ones and the user's), loaded,
    validated and encoded before any model exists."""

    paths: dict[str, Any]  # config key -> file read
    task: Any  # the generated built-in task (its RM prompts are sampled for rankings)
    tokenizer: Any
    ptx_examples: list
    eval_prompts: list[str]
    # sft, demo, prompts, eval, ptx, heldout; rank: the user's rankings (train, held out);
    # pretrain (the built-in task's text, when each process encodes only its rows)
    arrays: dict[str, Any]
    prompt_texts: list[str]  # the RL prompts as the file wrote them, row by row of "prompts"
    reports: list
    split: bool  # each process holds only its rows (loops/foundation_rows.py)
    user_rank_report: Any = None


def _load_data(cfg: Config, out: Path, runtime: Runtime, own_rows: bool) -> _Data:
    """Generate the built-in task's files, then load, validate and encode every file (with
    `own_rows` and several processes, each process only its rows)."""
    t = cfg.task
    module = TASKS[t.name]
    options = module.task_options(t) if hasattr(module, "task_options") else {}
    task = module.generate_task(
        cfg.seed,
        t.n_pretrain_texts,
        t.n_demonstrations,
        t.n_rm_prompts,
        t.n_eval_prompts,
        **options,
    )
    data_dir = out / "data"
    paths = {
        "sft.data": cfg.sft.data or write_jsonl_once(data_dir / "sft.jsonl", task.sft),
        "ppo.prompts": cfg.ppo.prompts
        or write_jsonl_once(data_dir / "ppo_prompts.jsonl", task.ppo_prompts),
        "ptx.data": cfg.ptx.data or write_jsonl_once(data_dir / "pretrain.jsonl", task.pretrain),
        "rm.data": cfg.rm.data,
    }
    heldout_path = write_jsonl_once(data_dir / "pretrain_heldout.jsonl", task.pretrain_heldout)
    eval_path = write_jsonl_once(data_dir / "eval_prompts.jsonl", task.eval_prompts)
    on_error = cfg.data.on_error
    sft_examples, sft_report = load_sft(paths["sft.data"], on_error)
    prompt_examples, prompt_report = load_prompts(paths["ppo.prompts"], on_error)
    ptx_examples, ptx_report = load_texts(paths["ptx.data"], on_error)
    heldout_examples, heldout_report = load_texts(heldout_path)
    eval_examples, eval_report = load_prompts(eval_path)
    user_rankings = load_rankings(cfg.rm.data, on_error, cfg.rm.allow_ties) if cfg.rm.data else None

    if cfg.model.path is None:
        texts = [e.text for e in ptx_examples] + [e.prompt + e.completion for e in sft_examples]
        tokenizer = train_tokenizer(texts, t.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.model.path)
    encode = RunEncoder(cfg, tokenizer)
    files = {"sft": (sft_examples, sft_report), "prompts": (prompt_examples, prompt_report),
             "ptx": (ptx_examples, ptx_report), "heldout": (heldout_examples, heldout_report),
             "eval": (eval_examples, eval_report)}  # fmt: skip
    split = own_rows and splits_rows(cfg)
    if split:
        arrays, prompt_texts = encode_shares(cfg, encode, files, runtime)
    else:
        arrays, prompt_texts = _encode_all(cfg, encode, files)
    if user_rankings is not None:  # the user's rankings are encoded (and checked) up front too
        # (packed rankings are packed from every row)
        arrays["rank"] = stage_rankings(
            cfg, user_rankings[0], encode, user_rankings[1], "rm", split and not cfg.rm.pack
        )
    return _Data(
        paths,
        task,
        tokenizer,
        ptx_examples,
        [e.prompt for e in eval_examples],
        arrays,
        prompt_texts,
        [sft_report, prompt_report, ptx_report],
        split,
        user_rankings[1] if user_rankings is not None else None,
    )


def _encode_all(cfg: Config, encode: RunEncoder, files: dict) -> tuple[dict, list[str]]:
    """`encode_shares`' arrays (loops/foundation_rows.py) with every row of every file."""
    sft, sft_report = files["sft"]
    ptx, ptx_report = files["ptx"]
    prompt_arrays, prompt_texts = encode.rl_prompts(*files["prompts"])
    arrays = {
        "sft": encode.sft(sft, sft_report, pack=cfg.sft.pack),
        "prompts": prompt_arrays,
        "eval": encode.prompts(files["eval"][0]),
        "ptx": encode.lm_texts(ptx, cfg.ptx.max_len, ptx_report),
        "heldout": encode.lm_texts(files["heldout"][0], cfg.ptx.max_len),
    }
    # One demonstration per row, for the RM bias normalisation (reward at each row's end).
    arrays["demo"] = encode.sft(sft) if cfg.sft.pack else arrays["sft"]
    return arrays, prompt_texts


def _check_data(cfg: Config, d: _Data, model_cfg: ModelConfig, eos, pad) -> None:
    """Every file against the base model's config and its batch sizes."""
    a, paths = d.arrays, d.paths
    batches = {
        "sft.data": (paths["sft.data"], a["sft"], "sft.batch_size", cfg.sft.batch_size, 0),
        "ppo.prompts": (
            paths["ppo.prompts"], a["prompts"], "ppo.rollout_batch", cfg.ppo.rollout_batch, 0
        ),
    }  # fmt: skip
    if cfg.ptx.coef > 0:
        batches["ptx.data"] = (paths["ptx.data"], a["ptx"], "ptx.batch_size", cfg.ptx.batch_size, 0)
    if "rank" in a:  # held-out rankings are split off before training
        train, held = a["rank"]
        n_held = 0 if held is None else len(held["input_ids"])
        what = f"{cfg.rm.data} (less {n_held} held out)"
        batches["rm.data"] = (what, train, "rm.batch_size", cfg.rm.batch_size, 0)
        if held is not None:  # (its tokens checked; its rows are no batch's)
            batches["rm.data (held out)"] = (what, held, "rm.batch_size", 1, 0)
    _check_against_model(cfg, model_cfg, d.tokenizer, (eos[0], pad), batches)


def _base_model(cfg: Config, d: _Data, keys, logger, runtime, out: Path):
    """The built-in task's random model pretrained on its text, or `model.path` loaded."""
    if cfg.model.path is not None:
        return load_model(cfg.model.path, cfg, runtime)
    model_cfg, params = init_random_model(cfg.model, d.tokenizer, keys["init"], runtime)
    pre = cfg.pretrain
    arrays = d.arrays.get("pretrain")  # this process's rows, when each encodes only its own
    if arrays is None:
        arrays = RunEncoder(cfg, d.tokenizer).lm_texts(d.ptx_examples, pre.max_len)
    params = train_supervised(
        pretrain_spec(cfg, model_cfg),
        params,
        arrays,
        StageRun(
            key=keys["pretrain"],
            logger=logger,
            runtime=runtime,
            checkpoints=StageCheckpoints(
                out, "pretrain", cfg.checkpoint, pipeline_settings(cfg, "pretrain")
            ),
        ),
    )
    return model_cfg, params


def _rankings(cfg: Config, d: _Data, model_cfg, sft_params, key, special, out: Path):
    """`(train, held out, report, notes)`: the user's rankings, or (built-in task) K samples
    per prompt from the SFT policy ranked by the simulated labelers, split by
    `rm.heldout_fraction` (the training rows this process's, `stage_rankings`, when split).
    special: ((eos, pad), runtime)."""
    if "rank" in d.arrays:
        return *d.arrays["rank"], d.user_rank_report, []
    prompts = d.task.rm_prompts
    rows = _sample_rankings(cfg, model_cfg, sft_params, d.tokenizer, prompts, key, special, d.split)
    rankings, report = load_rankings(write_jsonl_once(out / "data" / "rankings.jsonl", rows))
    unranked = len(prompts) - len(rankings)  # (every process knows it from the file)
    notes = [f"{unranked} RM prompts not ranked: fewer than 2 distinct samples"] if unranked else []
    encode = RunEncoder(cfg, d.tokenizer)
    split = d.split and not cfg.rm.pack  # packed rankings are packed from every row
    return *stage_rankings(cfg, rankings, encode, report, "rm", split), report, notes


def build_foundation(
    cfg: Config,
    out_dir: str | Path,
    reward_model: bool = True,
    *,
    algo: Any = None,
    own_rows: bool = False,
) -> Foundation:
    """Check every part the config names (`algo`: the RLAlgorithm of `cfg.ppo` when the
    caller resolved them already, else resolved here), write run_config.json, load and
    validate all data, then pretrain (built-in task), SFT (saved to OUT/sft) and the reward
    model (OUT/rm). Without `reward_model` (a verifiable-reward task) no rankings are sampled
    and no RM is trained: the fields that hold them are None. `own_rows`: with several
    processes each encodes only the rows its batches read (loops/foundation_rows.py), for a
    caller that runs only `cfg`'s own stages (the pipeline; not compare's other rows)."""
    names = (*cfg.compare.algorithms, *cfg.compare.preference)
    writes = ("sft", "rm", "policy", "data", "sft_adapter", "policy_adapter")
    writes += tuple(f"policies/{n}" for n in names)
    algo = algo if algo is not None else resolve_config_parts(cfg)
    out, logger, runtime = start_run(cfg, out_dir, {"model.path": cfg.model.path}, writes, algo)
    keys = stage_keys(cfg.seed)
    d = _load_data(cfg, out, runtime, own_rows)
    check_reward_fns(cfg, d.prompt_texts)  # before any model is made or trained
    eos, pad = stop_ids(d.tokenizer)
    # The base model's config first, to check the data against it before any weight is made.
    if cfg.model.path is None:
        _check_data(cfg, d, random_model_config(cfg.model, d.tokenizer), eos, pad)
    else:
        _check_data(cfg, d, read_hf_config(cfg.model.path), eos, pad)
    model_cfg, params = _base_model(cfg, d, keys, logger, runtime, out)
    # The pad id the data is padded with: the reward model reads the last token that is not
    # it (transformers' rule), and the saved folders name it in config.json.
    model_cfg = model_cfg.replace(pad_token_id=pad)

    # Step 1: SFT.
    sft_params = train_supervised(
        sft_spec(cfg, model_cfg),
        params,
        d.arrays["sft"],
        StageRun(
            key=keys["sft"],
            logger=logger,
            runtime=runtime,
            checkpoints=StageCheckpoints(out, "sft", cfg.checkpoint, pipeline_settings(cfg, "sft")),
            adapter_dir=out / "sft_adapter",
        ),
    )
    save_hf(model_cfg, sft_params, out / "sft", d.tokenizer)
    a = d.arrays
    common = dict(out=out, logger=logger, runtime=runtime, keys=keys, tokenizer=d.tokenizer,
                  eos=eos, pad=pad, model_cfg=model_cfg, sft_params=sft_params,
                  prompt_arrays=a["prompts"], prompt_texts=d.prompt_texts, ptx_arrays=a["ptx"],
                  heldout_arrays=a["heldout"], eval_prompts=d.eval_prompts,
                  eval_arrays=a["eval"], algo=algo)  # fmt: skip
    if not reward_model:
        return Foundation(**common, reports=list(d.reports))

    # Step 2: the reward model on rankings (sampled from SFT and ranked, for the built-in task).
    rm_train, rm_held, rank_report, notes = _rankings(
        cfg, d, model_cfg, sft_params, keys["rm_sample"], ((eos, pad), runtime), out
    )
    rm_checkpoints = StageCheckpoints(out, "rm", cfg.checkpoint, pipeline_settings(cfg, "rm"))
    rm_run = StageRun(key=keys["rm"], logger=logger, runtime=runtime, checkpoints=rm_checkpoints)
    rm_params = train_reward_model(cfg, model_cfg, sft_params, rm_train, rm_run)
    trained_rm = rm_params
    rm_params, bias_shift = shift_reward_bias(model_cfg, trained_rm, d.arrays["demo"], runtime)
    save_scalar_model(model_cfg, rm_params, out / "rm", d.tokenizer)
    # Read back from the loss's metrics only once the model is saved (the shift changes no pair).
    held = reward_accuracy(cfg, model_cfg, trained_rm, rm_held, runtime=runtime)
    return Foundation(
        **common,
        rm_params=rm_params,
        rank_train=rm_train,
        rank_heldout=rm_held,
        rm_heldout=held,
        rm_bias_shift=bias_shift,
        reports=[*d.reports, rank_report],
        notes=notes,
    )
