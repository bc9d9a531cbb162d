"""The RL stage as a host loop: PPO, GRPO, RLOO, REINFORCE++, ... from the `ppo` config section.

Each iteration is two compiled calls, experience and update, with explicit shardings on the
run's mesh; with a reward function over text (`ppo.reward_fn`) sampling and the rest of the
experience are two calls with the host scoring the decoded responses in between. Only the
parts the algorithm uses exist: no critic (weights, optimizer, forward, checkpoint entries)
for critic-free estimators, no reference weights without a KL term, no reward model when a
reward function scores.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data import batches
from rlhf_jax.data.shard import HeldRows
from rlhf_jax.loops.adapters import adapts, announce
from rlhf_jax.loops.build import Assembly, StageBuild
from rlhf_jax.loops.build_rl import RLBuildSpec, rl_build, uses_ptx
from rlhf_jax.loops.host_scoring import host_scorer
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.packed_update import PackedUpdate
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.rollout_stages import filtered_experience, prompt_drawer
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import CompiledOnce, Stage, run_stage
from rlhf_jax.loops.trimmed_update import TrimmedUpdate
from rlhf_jax.metrics import merged_metrics
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf.adapters import save_adapters
from rlhf_jax.models.lora import fold_adapters, merge_trees, with_lora
from rlhf_jax.sharding import init_sharded_state, local_batch_rows, make_global_batch
from rlhf_jax.steps import RLAlgorithm, policy_weights


@dataclasses.dataclass
class RLModels:
    """The models RL starts from: the SFT policy (also the frozen reference) and the reward
    model (also the critic's initialisation, as in InstructGPT); no reward model when a reward
    function scores the responses."""

    policy_cfg: ModelConfig
    sft_params: dict
    reward_cfg: ModelConfig | None = None
    reward_params: dict | None = None


def final_policy(
    cfg: Config, models: RLModels, state, adapter_dir: Path | None = None, base_model=None
) -> Any:
    """The trained policy as plain weights of `models.policy_cfg`: the EMA weights when kept,
    for a LoRA policy its adapters folded into the SFT base, without a shared value head.
    With `lora.save_adapters`, the adapters alone also go to `adapter_dir`."""
    trained = state.ema_params if state.ema_params is not None else state.policy.params
    trained = {k: v for k, v in trained.items() if k != "value_head"}  # ppo.critic=shared_trunk
    if not adapts(cfg.lora, "policy"):
        return trained
    lora = cfg.lora
    adapted = with_lora(models.policy_cfg, lora.rank, lora.alpha, lora.targets)
    if adapter_dir is not None and lora.save_adapters:
        save_adapters(adapted, trained, adapter_dir, base_model)
    return fold_adapters(adapted, merge_trees(models.sft_params, trained))[1]


@dataclasses.dataclass
class _Programs:
    """The compiled programs of one RL run and what feeds them."""

    experience: Callable  # (state, prompt batch, key, texts, draw) -> (Experience, metrics)
    update: Callable  # (state, experience, ptx batch, key) -> (state, metrics)
    compiled: list  # every program (CompiledOnce, TrimmedUpdate), for the memory figure
    use_ptx: bool
    n_mb: int  # minibatches per epoch


def train_rl(
    cfg: Config,
    models: RLModels,
    prompts: dict[str, np.ndarray],
    ptx: dict[str, np.ndarray] | None,
    eos_ids: tuple[int, ...],
    pad_id: int,
    key: jax.Array,
    logger: MetricsLogger,
    *,
    runtime: Runtime,
    stage: str = "ppo",
    checkpoints: StageCheckpoints | None = None,
    tokenizer=None,
    prompt_texts: list[str] | None = None,
    algo: RLAlgorithm | None = None,
):
    """RL from the SFT policy by the algorithm `cfg.ppo` names (`algo`: resolved already by
    the caller, else here); returns the final RLState. `tokenizer` decodes responses and
    `prompt_texts` (each prompt row as the data file wrote it) are the prompts for a reward
    function (`ppo.reward_fn`)."""
    data = (prompts, ptx, prompt_texts)
    spec = rl_stage(
        cfg, models, data, (eos_ids, pad_id), key, runtime, stage=stage, tokenizer=tokenizer,
        algo=algo,
    )  # fmt: skip
    return run_stage(spec, key, logger, checkpoints)


def rl_stage(
    cfg, models, data, special, key, runtime, *, stage="ppo", tokenizer=None, algo=None
) -> Stage:
    """The RL stage for the one host loop: an iteration (experience, then the update's epochs
    x minibatches) is one step. data: (prompt arrays, ptx arrays or None, prompt texts or
    None: needed with a reward function); special: (EOS ids, pad id)."""
    ppo = cfg.ppo
    algo = algo if algo is not None else RLAlgorithm.from_config(ppo)
    spec = RLBuildSpec(
        cfg=cfg,
        algo=algo,
        policy_cfg=models.policy_cfg,
        reward_cfg=models.reward_cfg,
        special=special,
        use_ptx=uses_ptx(cfg, data[1] is not None),
    )
    build = rl_build(spec, runtime)
    starts = {"policy": models.sft_params}
    if models.reward_params is not None:
        # Also with a reward function: a critic starts as the reward model when there is one
        # (compare's "<name>_gold" rows), which is then only read to initialise it.
        starts["reward"] = models.reward_params
    a = build.assemble(starts, key)
    weights = a.info["weights"]
    announce(weights["policy"], stage)
    if weights["critic"].config is not None:
        announce(weights["critic"], f"{stage} critic")

    def init():
        return init_sharded_state(a.create, a.inputs, a.input_shardings, runtime.mesh)

    def program(state_sh, start: int):
        programs = _compile(spec, build, a, state_sh, (runtime, tokenizer))
        return _iteration(cfg, programs, data, start, runtime)

    limits = {"ppo/policy": ppo.policy_optim.max_consecutive_skips}
    if weights["critic"].config is not None:
        limits["ppo/value"] = ppo.value_optim.max_consecutive_skips
    return Stage(
        stage,
        ppo.iterations,
        init,
        program,
        learned=lambda state: {"ppo/policy": state.policy},
        limits=limits,
        log_every=1,
        sync=True,
    )


def _compile(spec: RLBuildSpec, build: StageBuild, a: Assembly, state_sh, where) -> _Programs:
    """The run's programs from the stage's build: experience and update.
    where: (runtime, tokenizer)."""
    runtime, tokenizer = where
    ppo, frozen = spec.cfg.ppo, a.frozen
    *made, update_program = build.programs(a, state_sh)
    if spec.algo.filters:  # sample -> score -> filters (-> more rounds) -> finish
        by_name = {p.name: CompiledOnce(p.jitted) for p in made}
        experience = filtered_experience(
            spec, by_name, policy_cfg=a.info["policy"], frozen=frozen, runtime=runtime,
            tokenizer=tokenizer,
        )  # fmt: skip
        compiled = list(by_name.values())
    else:
        experience, compiled = _experience(spec, made, a, runtime, tokenizer)
    # A LoRA policy's update also reads its base (`frozen`).
    extra = (frozen,) if "frozen" in update_program.roles else ()
    trim = None
    if ppo.trim_update:  # one program per length bucket (steps/rl_trim.py)
        trim = TrimmedUpdate(
            update_program.jitted, runtime.mesh, runtime.rules, extra, ppo.buckets_per_doubling
        )
    if ppo.pack_update:  # one program per packed shape (steps/rl_pack.py)
        compiled_update = update = PackedUpdate(
            update_program.jitted_for_layout, ppo, runtime.mesh, runtime.rules, extra, trim
        )
    elif trim is not None:
        compiled_update = update = trim
    else:
        compiled_update = update = CompiledOnce(update_program.jitted)
        if extra:

            def update(state, exp, ptx_batch, key):
                return compiled_update(state, exp, ptx_batch, key, *extra)

    n_mb = ppo.episodes // ppo.minibatch_size
    return _Programs(experience, update, [*compiled, compiled_update], spec.use_ptx, n_mb)


def rl_batches(cfg: Config) -> dict[str, tuple[int, int, int, str]]:
    """The RL stage's batches of each file: (global batch size, batches a whole run takes,
    their seed, the batch size's config key). One prompt batch per iteration; one ptx batch
    per minibatch of every epoch."""
    ppo = cfg.ppo
    n_mb = ppo.episodes // ppo.minibatch_size
    return {
        "prompts": (ppo.rollout_batch, ppo.iterations, cfg.seed + 2, "ppo.rollout_batch"),
        "ptx": (
            cfg.ptx.batch_size,
            ppo.iterations * ppo.epochs * n_mb,
            cfg.seed + 3,
            "ptx.batch_size",
        ),
    }


def _iteration(cfg, programs, data, start, runtime):
    """`step(state, it, key)`: one RL iteration, experience then update, with the prompt (and
    ptx) batches from iteration `start` on. Prompts and ptx rows: every row, or only those
    this process reads (`HeldRows`)."""
    (prompts, ptx, texts), ppo, n_mb = data, cfg.ppo, programs.n_mb
    spec = rl_batches(cfg)
    # One prompt batch per iteration and epochs x minibatches ptx batches: from `start` on.
    # Each batch carries its rows' indices (host only), to give a reward function the texts;
    # the order depends only on the row count and the seed, so the batches are unchanged.
    if isinstance(prompts, HeldRows):
        with_rows = prompts.with_arrays(row=prompts.rows)
        draw = None  # (rows are split per process only without rollout filters)
    else:
        with_rows = {**prompts, "row": np.arange(len(prompts["input_ids"]))}
        draw = prompt_drawer(prompts, texts, ppo.rollout_batch, runtime)  # rounds after a filter
    size, _, seed, _ = spec["prompts"]
    prompt_iter = batches(with_rows, size, seed, start=start)
    ptx_iter = None
    if programs.use_ptx:
        size, _, seed, _ = spec["ptx"]
        ptx_iter = batches(ptx, size, seed, start=start * ppo.epochs * n_mb)

    def step(state, it, key):
        t0 = time.time()
        exp_key, upd_key = jax.random.split(key)
        host = next(prompt_iter)
        row = host.pop("row")
        prompt_texts = None if texts is None else [texts[i] for i in row]
        batch = runtime.global_batch(host, "ppo.rollout_batch")
        exp, exp_metrics = programs.experience(state, batch, exp_key, prompt_texts, draw)
        ptx_batch = None
        if programs.use_ptx:
            ptx_batch = _ptx_batch(ptx_iter, ppo.epochs, n_mb, runtime)
        state, upd_metrics = programs.update(state, exp, ptx_batch, upd_key)
        # An iteration is long enough that waiting for its metrics costs little, and every
        # iteration's numbers are worth keeping.
        jax.block_until_ready((exp_metrics, upd_metrics))
        tokens = float(jnp.sum(exp.response_mask))
        # XLA's account of the largest program: a per-device peak (weights, optimizer state,
        # activations, KV cache), the same on every iteration.
        peak = max(p.peak_bytes() for p in programs.compiled)
        perf = {
            "perf/tokens_per_second": tokens / (time.time() - t0),
            "perf/peak_device_mib": peak / 2**20,
        }
        return state, merged_metrics(
            ("the experience", exp_metrics), ("the update", upd_metrics), ("the RL loop", perf)
        )

    return step


def _experience(spec: RLBuildSpec, made: list, a: Assembly, runtime: Runtime, tokenizer):
    """`experience(state, prompt_batch, key, prompt texts, draw) -> (Experience, metrics)` and
    its compiled programs (`made`: the build's, `a` its assembly): one call when the reward
    model scores; sample, host scoring, finish when a reward function does."""
    frozen = a.frozen
    if spec.algo.reward_fn is None:
        (p,) = made
        fn = CompiledOnce(p.jitted)

        def experience(state, b, k, prompt_texts=None, draw=None):
            return fn(state, frozen, b["input_ids"], b["attention_mask"], k)

        return experience, [fn]
    if tokenizer is None:
        raise ValueError("a reward function over text needs the tokenizer to decode responses")
    sample, finish = (CompiledOnce(p.jitted) for p in made)
    trained_cfg, mesh, rules = a.info["policy"], runtime.mesh, runtime.rules
    score = host_scorer(spec.algo, tokenizer, spec.cfg.ppo.samples_per_prompt)

    def experience(state, b, k, prompt_texts, draw=None):
        if prompt_texts is None:
            raise ValueError("a reward function over text needs the prompts' texts")
        policy = policy_weights(trained_cfg, state, frozen)
        rollout = sample(policy, b["input_ids"], b["attention_mask"], k)
        rows, local_scores = score(rollout, prompt_texts)
        n = rollout.response_ids.shape[0]
        expected = local_batch_rows(n, mesh, rules, "ppo.rollout_batch")
        if rows != expected:  # the rollout is split like every batch (jit_sample's rows)
            raise ValueError(f"rollout rows {rows} held here are not the batch's {expected}")
        scores = make_global_batch(local_scores, mesh, rules, "ppo.rollout_batch")
        return finish(state, frozen, rollout, scores)

    return experience, [sample, finish]


def _ptx_batch(ptx_iter, epochs: int, n_mb: int, runtime: Runtime) -> dict:
    """One pretraining batch per minibatch of the iteration: [epochs, n_mb, ptx_bs, L]."""
    rows = [next(ptx_iter) for _ in range(epochs * n_mb)]
    shape = (epochs, n_mb, *rows[0]["input_ids"].shape)
    stacked = {
        k: np.stack([r[k] for r in rows]).reshape(shape) for k in ("input_ids", "attention_mask")
    }
    return runtime.global_batch(stacked, "ptx.batch_size", batch_axis=2)
