"""What every command does before its first stage and the pipeline shares with the stage
commands: the run's output folder, logger and runtime; models loaded into their shards; the
special token ids; the reward model's bias shift. Written once here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf_jax.config import Config, to_dict
from rlhf_jax.data import special_ids
from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops.logging import MetricsLogger, prepare_output_dir, write_run_config
from rlhf_jax.loops.output_lock import lock_output
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.stages import score_all
from rlhf_jax.models import ModelConfig, load_hf
from rlhf_jax.models.hf import read_hf_config
from rlhf_jax.steps import RLAlgorithm, normalize_reward_bias, resolve_config_parts


def start_run(
    cfg: Config,
    out_dir: str | Path,
    inputs: dict[str, str | None],
    writes: tuple[str, ...],
    algo: RLAlgorithm | None = None,
) -> tuple[Path, MetricsLogger, Runtime]:
    """Check every part the config names (unless the caller resolved them already: `algo`,
    from `resolve_config_parts`), prepare the output folder (refusing one that is or
    would write into an input model folder: `inputs` maps config keys to those folders,
    `writes` names the subfolders the run writes), lock it against other runs (held until
    the command ends, see `output_lock`), write run_config.json, and start the logger and
    the device runtime."""
    if algo is None:
        resolve_config_parts(cfg)
    out = prepare_output_dir(out_dir, inputs, writes)
    lock_output(out)  # before anything in the folder is written or removed
    run_config = to_dict(cfg)
    write_run_config(out, run_config)
    return out, MetricsLogger.from_config(out, cfg.log, run_config), Runtime.from_config(cfg)


def load_model(path: str, cfg: Config, runtime: Runtime) -> tuple[ModelConfig, dict]:
    """A Hugging Face checkpoint loaded straight into its shards on the run's mesh, with the
    config's storage and compute dtypes, its remat, attention path and logits_chunk switches."""
    shardings = runtime.param_shardings(read_hf_config(path))
    config, params = load_hf(
        path, dtype=cfg.model.param_dtype, compute_dtype=cfg.model.dtype, shardings=shardings
    )
    return config.replace(
        remat=cfg.model.remat, attention=cfg.model.attention, logits_chunk=cfg.model.logits_chunk
    ), params


def stop_ids(tokenizer) -> tuple[tuple[int, ...], int]:
    """`(EOS ids, pad id)` as generation takes them."""
    eos, pad = special_ids(tokenizer)
    return (eos,), pad


def shift_reward_bias(
    model_cfg: ModelConfig, params: dict, demos: dict[str, np.ndarray] | HeldRows, runtime=None
):
    """InstructGPT's normalisation after RM training: shift the head's bias so that the SFT
    demonstrations score 0 on average (scored on `runtime`'s mesh; `HeldRows`: each
    process scores its own). Returns the new weights and the shift."""
    scores = score_all(model_cfg, params, demos, runtime=runtime)
    return normalize_reward_bias(params, scores), float(scores.mean())
