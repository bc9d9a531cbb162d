"""The offline preference stage (DPO and its variants) as a host loop over the pure step: the
reference's log-probs once, then the training loop every supervised stage shares, then the
held-out evaluation (implicit-reward accuracy and the KL to the reference on held-out prompts).

Reference log-probs are computed before training, one forward of the reference over the
rankings, and travel with the batches: while training only the policy and its optimizer
state occupy the device (no second model), and the step costs one forward and backward. The
price is that forward pass up front (cheaper than one per step as soon as a ranking is seen
more than once) and 4 bytes per completion of host memory.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops import evaluate as ev
from rlhf_jax.loops.batched import map_params
from rlhf_jax.loops.build_supervised import dpo_spec
from rlhf_jax.loops.owned_rows import every_row
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.stages import packed_rankings, train_supervised
from rlhf_jax.loops.train import StageRun
from rlhf_jax.losses import get_loss
from rlhf_jax.losses.accumulation import batch_counts
from rlhf_jax.models import ModelConfig
from rlhf_jax.steps.preference import (
    completion_token_mask,
    make_logps_fn,
)


def _loss_fn(cfg: Config):
    d = cfg.dpo
    return get_loss("preference", d.loss, beta=d.beta, **d.loss_kwargs)


@functools.lru_cache(maxsize=8)
def _logps_fn(model_cfg: ModelConfig):
    """One log-prob function per model (reference, policy, held-out: one compile)."""
    return make_logps_fn(model_cfg)


KEYS = ("input_ids", "attention_mask", "completion_start")


def sequence_logps(
    model_cfg: ModelConfig, params, arrays: dict, batch_size: int, runtime: Runtime | None = None
) -> np.ndarray:
    """[N, K] summed completion log-probs of every ranking row under `params` (`runtime`
    here and below: evaluate on its mesh, None: one device; see loops/batched.py)."""
    return map_params(_logps_fn(model_cfg), params, arrays, KEYS, batch_size, runtime).astype(
        np.float32
    )


def with_reference_logps(
    model_cfg: ModelConfig,
    ref_params,
    arrays: dict | HeldRows,
    batch_size: int,
    runtime: Runtime | None = None,
):
    """The ranking arrays with `ref_logps` [N, K], the reference's log-probs, added (to
    `HeldRows`: those of its rows, computed by their owners, loops/owned_rows.py)."""
    logps, _ = every_row(_logps_fn(model_cfg), ref_params, arrays, KEYS, batch_size,
                         runtime)  # fmt: skip
    logps = np.asarray(logps, np.float32)
    if isinstance(arrays, HeldRows):
        return arrays.with_arrays(ref_logps=logps[arrays.rows])
    return {**arrays, "ref_logps": logps}


def train_preference(
    cfg: Config,
    model_cfg: ModelConfig,
    policy_params,
    train: dict[str, np.ndarray],
    run: StageRun,
    stage: str = "dpo",
):
    """`dpo.steps` updates of the `dpo.loss` on `train` (ranking arrays with `ref_logps`),
    from `policy_params` (left intact); returns the trained weights (a LoRA policy's
    adapters folded in; with `lora.save_adapters` also written alone to `run.adapter_dir`).
    With `dpo.pack` the rankings (reference log-probs included) are packed first."""
    if cfg.dpo.pack:
        train = packed_rankings(train, cfg.dpo.batch_size, "dpo")
    return train_supervised(dpo_spec(cfg, model_cfg, stage), policy_params, train, run)


def preference_metrics(
    cfg: Config, model_cfg: ModelConfig, params, arrays: dict | HeldRows, runtime=None
) -> dict:
    """The loss's metrics (implicit-reward accuracy and margin, chosen/rejected log-probs)
    over every pair of `arrays` at once (ranking arrays with `ref_logps`, or `HeldRows`)."""
    held = arrays.arrays if isinstance(arrays, HeldRows) else arrays
    tokens = np.asarray(completion_token_mask(held))[..., 1:].sum(-1)
    if isinstance(arrays, HeldRows):
        arrays = arrays.with_arrays(completion_tokens=tokens)
    else:
        arrays = {**arrays, "completion_tokens": tokens}
    fn, bs = _logps_fn(model_cfg), cfg.dpo.batch_size
    logps, arrays = every_row(fn, params, arrays, KEYS, bs, runtime)
    loss_fn = _loss_fn(cfg)  # with the whole batch's counts, as in training (contract.keys)
    batch = {**arrays, **batch_counts("preference", loss_fn, arrays)}
    out = loss_fn({"logps": np.asarray(logps, np.float32)}, batch)
    return {k.removeprefix("dpo/"): float(v) for k, v in out.metrics.items()}


def ranking_prompts(arrays: dict, max_prompt_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The prompt of every ranking row, left-padded to `max_prompt_len` for sampling."""
    n = arrays["input_ids"].shape[0]
    ids = np.full((n, max_prompt_len), pad_id, np.int32)
    mask = np.zeros((n, max_prompt_len), np.float32)
    for i, start in enumerate(arrays["completion_start"]):
        ids[i, max_prompt_len - start :] = arrays["input_ids"][i, 0, :start]
        mask[i, max_prompt_len - start :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def heldout_kl(
    cfg: Config,
    model_cfg: ModelConfig,
    params,
    ref_params,
    arrays: dict,
    key: jax.Array,
    eos: tuple[int, ...],
    pad: int,
    *,
    lengths: str = "dpo",
    runtime: Runtime | None = None,
) -> float:
    """Mean KL estimate `log pi(y|x) - log pi_ref(y|x)` of the policy's own samples (temperature
    1) on the prompts of the held-out rankings, at the `lengths` section's budget."""
    section = getattr(cfg, lengths)
    prompts = ranking_prompts(arrays, section.max_prompt_len, pad)
    samples = ev.sample_responses(
        model_cfg,
        params,
        prompts["input_ids"],
        prompts["attention_mask"],
        key,
        max_new_tokens=section.max_completion_len,
        temperature=1.0,
        eos_ids=eos,
        pad_id=pad,
        batch_size=min(128, len(prompts["input_ids"])),
        runtime=runtime,
    )
    kl = ev.kl_to_reference(model_cfg, params, ref_params, samples, 1.0, 128, runtime)
    return float(np.mean(kl))
