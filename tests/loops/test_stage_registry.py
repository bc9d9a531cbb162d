"""A stage is one registration (rlhf_jax/stage_registry.py): a fork's toy stage registered
from a test module runs through the CLI's dispatch, has its settings checked and is listed
and built by `rlhf-jax plan`. (That a real `rlhf-jax ppo` resolves its algorithm once is checked
on the run of tests/loops/test_part_keys.py.)"""

import json

import pytest

from rlhf_jax.cli import main
from rlhf_jax.config import Config, load_config
from rlhf_jax.loops.runtime import Runtime
from rlhf_jax.plan.planner import builders, stage_names
from rlhf_jax.stage_registry import register_stage, stages, unregister_stage

PLAN_SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
              "model.mlp_dim=64", "task.vocab_size=512", "sft.batch_size=8", "pretrain.steps=0",
              "rm.steps=0", "ppo.iterations=0"]  # fmt: skip


@pytest.fixture
def echo_stage():
    import fork_stage

    register_stage(fork_stage.ECHO)
    yield fork_stage.ECHO
    unregister_stage("fork_echo")  # the other tests in this process see the built-in stages
    assert "fork_echo" not in [s.name for s in stages()]


def test_a_forks_stage_runs_through_the_cli(echo_stage, tmp_path, capsys):
    out = tmp_path / "echo_run"
    assert main(["fork_echo", "--output", str(out), "sft.steps=3", "seed=7"]) == 0
    assert capsys.readouterr().out.strip() == f"saved: {out / 'echo'}"
    seen = json.loads((out / "echo" / "echo.json").read_text())
    # The algorithm the CLI resolved once (PPO's default policy loss) is handed to it.
    assert seen == {"seed": 7, "sft.steps": 3, "policy_loss": "ppo_clip"}


def test_a_forks_stage_has_its_settings_checked(echo_stage, tmp_path, capsys):
    args = ["fork_echo", "--output", str(tmp_path / "x"), "sft.batch_size=4"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "error: config key 'sft.batch_size' is set, but `rlhf-jax fork_echo` does not read "
        "it: the toy stage trains nothing. Remove it\n"
    )


def test_plan_lists_and_builds_a_forks_stage(echo_stage):
    """`rlhf-jax plan`'s list of stages (what it then compiles) takes the fork's stage, built
    by the fork's own builder, after the built-in ones."""
    cfg = load_config(Config, None, PLAN_SMALL)
    assert stage_names(cfg) == ["sft", "fork_echo"]
    table = builders(cfg, Runtime.from_config(cfg))
    assert list(table) == ["sft", "fork_echo"]
    build = table["fork_echo"]()
    assert build.name == "fork_echo" and list(build.starts) == list(table["sft"]().starts)
    assert stage_names(load_config(Config, None, [*PLAN_SMALL, "sft.steps=0"])) == []


def test_without_the_fork_the_cli_has_no_such_command(capsys):
    with pytest.raises(SystemExit):
        main(["fork_echo", "--output", "/tmp/unused"])
    assert "invalid choice: 'fork_echo'" in capsys.readouterr().err
