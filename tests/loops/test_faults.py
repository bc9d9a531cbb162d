"""Numerical faults inside the train loop: NaN/Inf updates are skipped, counted and logged, and
too many in a row stop the run with a clear message while the newest checkpoint stays intact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.cli import main
from rlhf_jax.config import (
    DEFAULT_RULES,
    CheckpointConfig,
    MeshConfig,
    OptimConfig,
    PretrainConfig,
)
from rlhf_jax.loops.build_supervised import SupervisedSpec
from rlhf_jax.loops.guard import TrainingDiverged
from rlhf_jax.loops.logging import MetricsLogger
from rlhf_jax.loops.resume import StageCheckpoints
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.loops.train import StageRun, run_supervised
from rlhf_jax.sharding import make_mesh
from rlhf_jax.steps.state import make_supervised_step

W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)


def _loss(params, batch):
    err = batch["x"] @ params["w"] - batch["y"]
    # A poisoned row turns the loss (and every gradient) into NaN, as a bad batch would.
    poison = jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 1.0)
    loss = jnp.mean(err**2) * poison
    return loss, {"loss": loss}


def _batch(i, poisoned):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    return {
        "x": x,
        "y": x @ W_TRUE,
        "poison": np.full((4,), 1.0 if i in poisoned else 0.0, np.float32),
    }


def _run(tmp_path, n_steps, poisoned, limit=10, checkpoints=None, drop_poisoned=False):
    devices = jax.devices()[:1]
    runtime = Runtime(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices), DEFAULT_RULES)
    logger = MetricsLogger(tmp_path, progress=False)
    steps = [i for i in range(n_steps) if not (drop_poisoned and i in poisoned)]

    def make_batches(start):
        return (_batch(i, poisoned) for i in steps[start:])

    optim = OptimConfig(lr=0.1, schedule="constant", grad_clip=0.0, max_consecutive_skips=limit)
    step = make_supervised_step(_loss, 1, lambda batch: {})  # a toy loss: no counts
    spec = SupervisedSpec(
        name="toy",
        section=PretrainConfig(steps=len(steps), batch_size=4, optim=optim),
        model_cfg=None,
        make_step=lambda _: step,
        batch=lambda _: {},
        data_seed=0,
        log_every=1,
        shardings={"w": NamedSharding(runtime.mesh, PartitionSpec())},
    )
    run = StageRun(key=jax.random.key(0), logger=logger, runtime=runtime, checkpoints=checkpoints)
    state, _ = run_supervised(spec, {"w": jnp.zeros(3)}, make_batches, run)
    logger.close()
    return state, logger


def test_nan_updates_are_skipped_counted_and_logged(tmp_path, capsys):
    poisoned = {2, 5, 6}
    state, logger = _run(tmp_path / "a", 9, poisoned)
    rows = logger.history["toy"]
    assert rows[-1]["train/skipped_updates"] == 3
    assert [r["train/consecutive_skips"] for r in rows] == [0, 0, 1, 0, 0, 1, 2, 0, 0]
    assert logger.warnings == [
        "toy step 3: non-finite gradients, 1 update(s) skipped (1 in a row, 1 in all)",
        "toy step 6: non-finite gradients, 1 update(s) skipped (1 in a row, 2 in all)",
        "toy step 7: non-finite gradients, 1 update(s) skipped (2 in a row, 3 in all)",
    ]
    assert "warning: toy step 7" in capsys.readouterr().err
    # A skipped update leaves no trace: the weights (and Adam's moments and step count) are
    # exactly those of a run that never saw the poisoned batches.
    clean, _ = _run(tmp_path / "b", 9, poisoned, drop_poisoned=True)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(clean.params["w"]))
    assert np.all(np.isfinite(np.asarray(state.params["w"])))


def test_consecutive_skips_stop_the_run_and_keep_the_checkpoint(tmp_path):
    cfg = CheckpointConfig(save_every=2, keep=2, async_save=True)
    ckpts = StageCheckpoints(tmp_path, "toy", cfg)
    with pytest.raises(TrainingDiverged) as err:
        _run(tmp_path, 20, set(range(5, 20)), limit=3, checkpoints=ckpts)
    msg = str(err.value)
    assert "toy stopped at step 8: 3 updates in a row had NaN/Inf gradients" in msg
    assert "max_consecutive_skips=3" in msg
    assert "the newest checkpoint (step 6) is intact" in msg
    # The checkpoints hold finite weights equal to those after the last good step (5).
    good, _ = _run(tmp_path / "good", 5, set())
    ckpt = Checkpointer(tmp_path / "checkpoints" / "toy", 0, 2, read_only=True)
    assert ckpt.all_steps() == [4, 6]
    restored, meta = ckpt.restore(target=good)
    assert meta["step"] == 6
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(good.params["w"]))


def test_cli_stops_with_exit_2_and_no_traceback(run_dir, tmp_path, capsys):
    code = main(
        [
            "sft",
            "--output",
            str(tmp_path / "nan"),
            "log.progress=false",
            "sft.steps=20",
            "sft.loss=faulty_losses:always_nan",
            "sft.optim.max_consecutive_skips=3",
            "checkpoint.save_every=1",
            f"model.path={run_dir / 'sft'}",
            f"sft.data={run_dir / 'data' / 'sft.jsonl'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "error: sft stopped at step 3: 3 updates in a row had NaN/Inf gradients" in err
    assert "warning: sft step 1: non-finite gradients" in err
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").open()]
    assert all(np.isnan(r["sft/loss"]) for r in rows)


def test_ppo_stops_on_policy_skips_while_the_value_model_trains(run_dir, tmp_path, capsys):
    data = run_dir / "data"
    code = main(
        [
            "ppo",
            "--output",
            str(tmp_path / "ppo"),
            "log.progress=false",
            "ppo.iterations=5",
            "ppo.rollout_batch=16",
            "ppo.minibatch_size=8",
            "ppo.epochs=1",
            "ppo.max_new_tokens=8",
            "ptx.coef=0",
            "ppo.policy_loss=faulty_losses:nan_policy",
            "ppo.policy_optim.max_consecutive_skips=4",
            f"ppo.policy={run_dir / 'sft'}",
            f"ppo.reward_model={run_dir / 'rm'}",
            f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    # 2 minibatch updates per iteration: the 4th skip in a row comes in iteration 2.
    assert "error: ppo stopped at step 2: 4 updates in a row had NaN/Inf gradients " in err
    assert "(ppo/policy)" in err and "Traceback" not in err
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open()]
    assert [r["ppo/policy/skipped_updates"] for r in rows] == [2, 4]
    assert [r["ppo/value/skipped_updates"] for r in rows] == [0, 0]


@pytest.mark.parametrize(
    "content,kept",
    [
        (b"", b""),
        (b'{"a": 1}\n', b'{"a": 1}\n'),
        (b'{"a": 1}\n{"b": 2', b'{"a": 1}\n'),
        (b'{"b": 2', b""),
        (b"x" * 100 + b"\n" + b"y" * 50, b"x" * 100 + b"\n"),  # cut further back than a block
    ],
)
def test_a_line_cut_by_a_kill_is_dropped_on_restart(tmp_path, content, kept):
    from rlhf_jax.loops.logging import _drop_partial_last_line

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    _drop_partial_last_line(path, block=8)
    assert path.read_bytes() == kept
