"""Stop a stage part-way (checkpoint.stop_after, as on preemption), rerun the same command, and
get exactly the metrics and weights of an uninterrupted run."""

import json

import numpy as np
from processes import Process
from safetensors.numpy import load_file

from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.cli import main

SMALL = [
    "log.every=1",
    "log.progress=false",
    "rm.batch_size=8",
    "ppo.rollout_batch=16",
    "ppo.minibatch_size=8",
    "ppo.epochs=1",
    "ppo.max_new_tokens=8",
    "ptx.batch_size=8",
]


def _metrics(folder, stage):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    return {
        r["step"]: {k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
        for r in rows
        if r["stage"] == stage
    }


def _same_weights(a, b):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def _interrupted_and_whole(command, stop_after, tmp_path, capsys, paused_at=None):
    """`paused_at`: (--output URL, the local folder it lands in) of the interrupted run."""
    whole = tmp_path / "whole"
    output, paused = paused_at or (str(tmp_path / "paused"), tmp_path / "paused")
    assert main([*command, "--output", output, f"checkpoint.stop_after={stop_after}"]) == 0
    assert "stopped:" in capsys.readouterr().err
    assert main([*command, "--output", output]) == 0  # the same command, resumed
    assert main([*command, "--output", str(whole)]) == 0
    return paused, whole


def test_sft_resumes_exactly(run_dir, tmp_path, capsys):
    data = run_dir / "data"
    command = [
        "sft",
        *SMALL,
        "sft.steps=6",
        f"model.path={run_dir / 'sft'}",
        f"sft.data={data / 'sft.jsonl'}",
    ]
    paused, whole = _interrupted_and_whole(command, 3, tmp_path, capsys)
    assert sorted(_metrics(paused, "sft")) == [1, 2, 3, 4, 5, 6]
    assert _metrics(paused, "sft") == _metrics(whole, "sft")
    _same_weights(paused / "sft" / "model.safetensors", whole / "sft" / "model.safetensors")


def test_ppo_resumes_exactly(run_dir, tmp_path, capsys):
    data = run_dir / "data"
    command = [
        "ppo",
        *SMALL,
        "ppo.iterations=4",
        "ppo.adaptive_kl=true",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        f"ptx.data={data / 'pretrain.jsonl'}",
    ]
    paused, whole = _interrupted_and_whole(command, 2, tmp_path, capsys)
    assert sorted(_metrics(paused, "ppo")) == [1, 2, 3, 4]
    assert _metrics(paused, "ppo") == _metrics(whole, "ppo")
    _same_weights(paused / "policy" / "model.safetensors", whole / "policy" / "model.safetensors")


def test_ppo_with_a_filter_and_a_stateful_estimator_resumes_exactly(run_dir, tmp_path, capsys):
    """Rounds of sampling drawn from the iteration key replay exactly, and the estimator's
    own state (tests/fork_rollout_parts.py) is checkpointed and restored with the RL state."""
    data = run_dir / "data"
    command = [
        "ppo",
        *[a for a in SMALL if not a.startswith(("ppo.rollout_batch", "ptx."))],
        "ppo.iterations=4",
        "ptx.coef=0",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        "ppo.reward_fn=topics_gold",
        "ppo.advantage=fork_rollout_parts:moving_baseline",
        "ppo.samples_per_prompt=2",
        "ppo.rollout_batch=4",
        "ppo.rollout_filters=[{name: dynamic_sampling}]",
    ]
    paused, whole = _interrupted_and_whole(command, 2, tmp_path, capsys)
    rows = _metrics(paused, "ppo")
    assert sorted(rows) == [1, 2, 3, 4] and rows == _metrics(whole, "ppo")
    baselines = [rows[i]["fork/baseline"] for i in (1, 2, 3, 4)]
    # b_1 = b_2, the first batch's mean (its next state averages it with itself); then it moves
    assert baselines[0] == baselines[1] and len(set(baselines)) == 3
    assert any(r["rollout/filter_rounds"] > 1 for r in rows.values())  # rounds were drawn
    with Checkpointer(paused / "checkpoints" / "ppo", save_every=1, keep=2) as ckpt:
        names = ckpt.saved_names()
    assert {"advantage_state/baseline", "advantage_state/seen"} <= set(names), names
    _same_weights(paused / "policy" / "model.safetensors", whole / "policy" / "model.safetensors")


def test_sigterm_saves_and_exits_0(run_dir, tmp_path):
    """Preemption: SIGTERM mid-stage -> checkpoint at the next step, exit 0, resumable. The
    stage is DPO's; every stage runs on the same host loop (`loops/train.run_stage`)."""
    import signal
    import sys

    out = tmp_path / "preempted"
    cmd = [
        sys.executable,
        "-m",
        "rlhf_jax.cli",
        "dpo",
        "--output",
        str(out),
        *SMALL,
        "dpo.steps=100000",
        "dpo.batch_size=8",
        f"dpo.policy={run_dir / 'sft'}",
        f"dpo.data={run_dir / 'data' / 'rankings.jsonl'}",
    ]
    metrics = out / "metrics.jsonl"
    with Process(cmd) as proc:
        # steps logged: the handler (installed before training starts) is in place
        assert proc.wait_until(
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, poll=0.2
        ), f"the run ended before two steps were logged:\n{proc.stderr[-2000:]}"
        proc.send_signal(signal.SIGTERM)
        proc.finish()
        err = proc.stderr
    assert proc.returncode == 0, err[-2000:]
    assert "stopped: dpo stopped at step" in err
    saved = [p.name for p in (out / "checkpoints" / "dpo").iterdir() if p.name.isdigit()]
    assert saved and int(saved[0]) >= 2


def test_a_rerun_with_other_settings_is_refused(run_dir, tmp_path, capsys):
    """The same --output with another learning rate, model or data file does not silently
    reuse the finished checkpoint; settings that do not shape training (logging) resume; and
    checkpoint.resume=false trains again from scratch."""
    data = run_dir / "data"
    out = tmp_path / "run"
    base = ["sft", "--output", str(out), *SMALL, "sft.steps=2", f"sft.data={data / 'sft.jsonl'}"]
    model = f"model.path={run_dir / 'sft'}"
    assert main([*base, model]) == 0
    capsys.readouterr()
    assert main([*base, model, "log.every=2"]) == 0  # not a setting that shapes training
    assert "sft: resuming from step 2" in capsys.readouterr().out
    rows = (data / "sft.jsonl").read_text().splitlines()
    (tmp_path / "sft_less.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    for change, message in [
        ([model, "sft.optim.lr=0.0001"], "sft.optim.lr: 0.001 -> 0.0001"),
        ([f"model.path={run_dir / 'policy'}"], "model.path: contents changed"),
        ([model, f"sft.data={tmp_path / 'sft_less.jsonl'}"], "sft.data: contents changed"),
    ]:
        assert main([*base, *change]) == 2, change
        err = capsys.readouterr().err
        assert "holds sft checkpoints trained with other settings" in err and message in err, err
        assert "checkpoint.resume=false" in err
    # starting over replaces the checkpoints and trains with the new settings
    assert main([*base, model, "sft.optim.lr=0.0001", "checkpoint.resume=false"]) == 0
    assert "starting over; 1 old checkpoint(s) removed" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    args = ["sft", "--output", str(fresh), *SMALL, "sft.steps=2", f"sft.data={data / 'sft.jsonl'}"]
    assert main([*args, model, "sft.optim.lr=0.0001"]) == 0
    _same_weights(out / "sft" / "model.safetensors", fresh / "sft" / "model.safetensors")


def test_options_added_since_a_checkpoint_do_not_block_its_resume():
    """Checkpoints record their settings; an option added to the config later is absent from
    old ones. At its default it is the same run (resumes); set to anything else it is not."""
    from rlhf_jax.config import Config, load_config
    from rlhf_jax.loops.settings import differences, stage_settings

    sections = ("seed", "model", "sft")
    now = stage_settings(Config(), sections)
    old = {k: v for k, v in now.items() if k not in ("model.frozen_dtype", "sft.optim.mu_dtype")}
    assert differences(old, now) == []
    changed = load_config(Config, None, ["model.frozen_dtype=bfloat16"])
    assert differences(old, stage_settings(changed, sections)) == [
        'model.frozen_dtype: (absent) -> "bfloat16"'
    ]


def test_the_same_files_spelt_otherwise_resume(tmp_path, monkeypatch):
    """A rerun naming the same files relatively instead of absolutely, or from another
    working folder, is the same run; other contents under the same name are not."""
    from rlhf_jax.config import Config, load_config
    from rlhf_jax.loops.settings import differences, stage_settings

    (tmp_path / "a").mkdir()
    data = tmp_path / "a" / "demos.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    sections = ("seed", "model", "sft")

    def settings(spelt):
        cfg = load_config(Config, None, [f"sft.data={spelt}"])
        return stage_settings(cfg, sections, {"sft.data": cfg.sft.data})

    monkeypatch.chdir(tmp_path / "a")
    saved = settings("demos.jsonl")
    assert differences(saved, settings(str(data))) == []
    monkeypatch.chdir(tmp_path)
    assert differences(saved, settings("a/demos.jsonl")) == []
    assert differences(saved, settings("./a/../a/demos.jsonl")) == []
    data.write_text('{"prompt": "p", "completion": "other"}\n')
    assert differences(saved, settings("a/demos.jsonl")) == ["sft.data: contents changed"]
