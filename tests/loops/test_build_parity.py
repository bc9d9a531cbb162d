"""The planner compiles the very programs the loops run: every stage's programs, lowered once
as the loop calls them (its own entry point on real, placed weights and batches, stopped at
each program call) and once as `rlhf-jax plan` builds them on abstract inputs, give the same
StableHLO text, for each stage and the variants that change what a stage is built of."""

import functools

import jax
import numpy as np
import pytest

from rlhf_jax.config import DEFAULT_RULES, Config, MeshConfig, load_config
from rlhf_jax.loops import build_supervised as bs
from rlhf_jax.loops.build import Start
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.rl import RLModels, train_rl
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import CompiledOnce, StageRun, run_supervised
from rlhf_jax.plan import abstract as ab
from rlhf_jax.plan.planner import stage_table
from rlhf_jax.sharding import make_mesh
from rlhf_jax.steps import RLAlgorithm

TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.mlp_dim=64",
    "model.max_len=48",
    "task.vocab_size=300",
    "pretrain.batch_size=2",
    "pretrain.max_len=8",
    "sft.batch_size=2",
    "sft.max_len=8",
    "rm.batch_size=2",
    "rm.k=3",
    "rm.max_prompt_len=4",
    "rm.max_completion_len=4",
    "dpo.batch_size=2",
    "dpo.max_prompt_len=4",
    "dpo.max_completion_len=4",
    "ppo.rollout_batch=2",
    "ppo.minibatch_size=2",
    "ppo.epochs=1",
    "ppo.max_prompt_len=4",
    "ppo.max_new_tokens=3",
    "ptx.batch_size=2",
    "ptx.max_len=8",
    "ptx.coef=0",
]
LORA = ["lora.rank=2"]
GRPO = ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.minibatch_size=4"]
FILTER = ["ppo.rollout_filters=[{name: dynamic_sampling}]", "ppo.rollout_max_rounds=2"]
CASES = {
    "pretrain": ("pretrain", []),
    "sft": ("sft", []),
    "sft_lora": ("sft", LORA),
    "rm": ("rm", []),
    "dpo": ("dpo", []),
    "ppo": ("ppo", ["ptx.coef=1"]),
    "ppo_no_ptx_lora": ("ppo", LORA),
    "ppo_shared_trunk": ("ppo", ["ppo.critic=shared_trunk"]),
    "grpo_reward_fn": ("ppo", [*GRPO, "ppo.reward_fn=topics_gold"]),
    "grpo_no_critic": ("ppo", GRPO),
    "dapo_filter_reward_fn": ("ppo", [*GRPO, "ppo.reward_fn=topics_gold", *FILTER]),
    "dapo_filter_reward_model": ("ppo", [*GRPO, *FILTER]),
}


class _Stop(Exception):
    """Raised by the recording program call once the stage's last program is lowered."""


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(int(i)) for i in ids)


@pytest.fixture(scope="module")
def runtime():
    return Runtime(
        make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]), DEFAULT_RULES
    )


def _record_calls(monkeypatch, expected: int) -> list[str]:
    """The first call of each of the loop's compiled programs lowers it on the loop's own
    arguments; every call returns zeros placed as the program's outputs would be (nothing is
    compiled or run). Stops the loop once `expected` programs are lowered."""
    lowered_texts: dict[int, str] = {}

    def call(self, *args):
        lowered = self.jitted.lower(*args)
        lowered_texts.setdefault(id(self), lowered.as_text())
        if len(lowered_texts) == expected:
            raise _Stop
        return jax.tree.map(
            lambda o: jax.device_put(np.zeros(o.shape, o.dtype), o.sharding), lowered.out_info
        )

    monkeypatch.setattr(CompiledOnce, "__call__", call)
    return lowered_texts  # (in first-call order)


def _host_rows(abstract: dict, n: int) -> dict[str, np.ndarray]:
    """`n` rows of the batch `abstract` describes (the data encoders' shapes), host arrays."""
    out = {}
    for k, x in abstract.items():
        shape = (n, *x.shape[1:])
        out[k] = (np.arange(np.prod(shape)) % 7).reshape(shape).astype(x.dtype)
    return out


_WEIGHTS: dict = {}  # (start, seed) -> weights: one initialiser compile per model (no step runs)


def _weights(start: Start, runtime: Runtime, seed: int):
    """Starting weights placed in their shards, as the loops load them."""
    if (start, seed) in _WEIGHTS:
        return _WEIGHTS[start, seed]
    shapes = ab.model_params(start.config, runtime, start.scalar)[0]
    shardings = jax.tree.map(lambda x: x.sharding, shapes)
    weights = jax.jit(start.init, out_shardings=shardings)(jax.random.key(seed))
    return _WEIGHTS.setdefault((start, seed), weights)


def _loop_supervised(cfg, *, stage, runtime, tmp_path, monkeypatch, expected) -> list[str]:
    spec = getattr(bs, f"{stage}_spec")(cfg, ab.base_model(cfg, None))
    params = _weights(Start(spec.model_cfg, spec.scalar), runtime, 0)
    arrays = _host_rows(spec.batch(runtime), 2 * spec.section.batch_size)
    run = StageRun(
        key=jax.random.key(1), logger=MetricsLogger(tmp_path, progress=False), runtime=runtime
    )
    texts = _record_calls(monkeypatch, expected)
    with pytest.raises(_Stop):
        run_supervised(spec, params, arrays, run)
    return list(texts.values())


def _loop_rl(cfg: Config, *, runtime, tmp_path, monkeypatch, expected) -> list[str]:
    algo = RLAlgorithm.from_config(cfg.ppo)
    model_cfg = ab.base_model(cfg, None)
    sft = _weights(Start(model_cfg, False), runtime, 0)
    reward_cfg = reward = None
    if algo.reward_fn is None:
        reward_cfg, reward = model_cfg, _weights(Start(model_cfg, True), runtime, 1)
    models = RLModels(model_cfg, sft, reward_cfg, reward)
    ppo, n = cfg.ppo, 2 * cfg.ppo.rollout_batch
    ids = np.full((n, ppo.max_prompt_len), 5, np.int32)
    prompts = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.float32)}
    ptx = None
    if cfg.ptx.coef > 0:
        ptx_ids = np.full((4 * cfg.ptx.batch_size, cfg.ptx.max_len), 6, np.int32)
        ptx = {"input_ids": ptx_ids, "attention_mask": np.ones(ptx_ids.shape, np.float32)}
    special = (model_cfg.eos_ids or (0,), model_cfg.pad_token_id or 0)
    texts = _record_calls(monkeypatch, expected)
    with pytest.raises(_Stop):
        train_rl(
            cfg, models, prompts, ptx, *special, jax.random.key(2),
            MetricsLogger(tmp_path, progress=False), runtime=runtime, tokenizer=_Tokenizer(),
            prompt_texts=[f"prompt {i}" for i in range(n)], algo=algo,
        )  # fmt: skip
    return list(texts.values())


@pytest.mark.parametrize("case", list(CASES))
def test_planned_programs_are_the_programs_the_loop_runs(case, runtime, tmp_path, monkeypatch):
    stage, overrides = CASES[case]
    cfg = load_config(Config, None, [*TINY, *overrides])
    build = stage_table(cfg, runtime)[stage]()
    ab.abstract_stage(build, runtime)
    planned = [p.jitted.lower(*p.args).as_text() for p in build.program_list]
    run_loop = _loop_rl if stage == "ppo" else functools.partial(_loop_supervised, stage=stage)
    loop = run_loop(cfg, runtime=runtime, tmp_path=tmp_path, monkeypatch=monkeypatch,
                    expected=len(planned))  # fmt: skip
    assert len(loop) == len(planned)
    for program, want, got in zip(build.program_list, loop, planned):
        assert got == want, f"{case}: the plan's {program.name} is not the loop's"
