"""What every whole-task command does with a built foundation (`loops/foundation.py`): train an
RL stage from its SFT policy, and sample the held-out prompts with a policy and score them.
The pipeline, the RLVR pipeline and both comparisons call these, so a row of a comparison is
trained and scored exactly as the pipeline's own RL stage is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rlhf_jax.config import Config
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.foundation import Foundation
from rlhf_jax.loops.process_rows import OrderedShare
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.rl import RLModels, final_policy, train_rl
from rlhf_jax.loops.settings import pipeline_settings
from rlhf_jax.steps import RLAlgorithm
from rlhf_jax.tasks import TASKS


def run_rl(
    cfg: Config,
    f: Foundation,
    stage: str,
    ptx: bool = True,
    adapter_dir: Path | None = None,
    *,
    algo: RLAlgorithm | None = None,
):
    """The RL stage of `cfg.ppo` from the foundation's SFT policy (and its reward model, when
    it trained one: the reward, or with `ppo.reward_fn` the critic's start); returns the
    weights to evaluate (the EMA when kept) and the final state. `ptx`: whether ptx batches
    are given (the ptx ablation passes False); `adapter_dir`: where `lora.save_adapters`
    writes a LoRA policy's adapters; `algo`: `cfg.ppo`'s algorithm when resolved already
    (the foundation's own, `f.algo`, for the pipeline's RL stage)."""
    reward = (f.model_cfg, f.rm_params) if f.rm_params is not None else (None, None)
    models = RLModels(f.model_cfg, f.sft_params, *reward)
    state = train_rl(
        cfg,
        models,
        f.prompt_arrays,
        f.ptx_arrays if ptx else None,
        f.eos,
        f.pad,
        f.keys["ppo"],
        f.logger,
        runtime=f.runtime,
        stage=stage,
        checkpoints=StageCheckpoints(f.out, stage, cfg.checkpoint, pipeline_settings(cfg, "rl")),
        tokenizer=f.tokenizer,
        prompt_texts=f.prompt_texts,
        algo=algo,
    )
    params = final_policy(cfg, models, state, adapter_dir, str(f.out / "sft"))
    return params, state


def evaluate_policy(
    cfg: Config,
    f: Foundation,
    params,
    *,
    score: Callable[[str, str], float] | None = None,
    temperature: float | None = None,
    n_samples: int | None = None,
) -> ev.GoldEval:
    """Samples of `params` on the held-out evaluation prompts, each scored by `score` (the
    task's gold reward unless given), at `eval.temperature` x `eval.n_samples` unless given."""
    n_samples = cfg.eval.n_samples if n_samples is None else n_samples
    arrays = f.eval_arrays
    if isinstance(arrays, OrderedShare):  # this process's prompts, laid out for n_samples
        arrays = arrays.repeated(n_samples)
    return ev.evaluate_gold(
        f.model_cfg,
        params,
        f.tokenizer,
        f.eval_prompts,
        arrays,
        f.keys["eval"],
        score if score is not None else TASKS[cfg.task.name].gold_reward,
        max_new_tokens=cfg.ppo.max_new_tokens,
        temperature=cfg.eval.temperature if temperature is None else temperature,
        eos_ids=f.eos,
        pad_id=f.pad,
        n_samples=n_samples,
        runtime=f.runtime,
    )
