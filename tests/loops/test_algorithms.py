"""RL algorithms from config alone, end to end on the CLI: GRPO with no critic anywhere, and a
fork's loss, estimator and reward function from a module outside the library."""

import json
import textwrap

import pytest

from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.cli import main

SMALL = [
    "log.every=1",
    "log.progress=false",
    "ppo.iterations=2",
    "ppo.epochs=1",
    "ppo.max_new_tokens=8",
    "ptx.coef=0",
    "checkpoint.save_every=1",
]


def _inputs(run_dir):
    data = run_dir / "data"
    return [f"ppo.policy={run_dir / 'sft'}", f"ppo.prompts={data / 'ppo_prompts.jsonl'}"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


def _saved(folder):
    with Checkpointer(folder / "checkpoints" / "ppo", save_every=1, keep=2) as ckpt:
        return ckpt.saved_names()


def test_grpo_from_config_alone_has_no_critic(run_dir, tmp_path):
    out = tmp_path / "grpo"
    args = [
        "ppo",
        *SMALL,
        *_inputs(run_dir),
        f"ppo.reward_model={run_dir / 'rm'}",
        "ppo.advantage=grpo",
        "ppo.samples_per_prompt=4",
        "ppo.kl_penalty=loss",
        "ppo.rollout_batch=4",
        "ppo.minibatch_size=8",
    ]
    assert main([*args, "--output", str(out)]) == 0
    names = _saved(out)
    assert any(n.startswith("policy/params/") for n in names)
    assert any(n.startswith("policy/opt_state/") for n in names)
    assert not [n for n in names if n.startswith("critic") or "value" in n], names
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert not [k for k in row if k.startswith("ppo/value")]
        assert row["ppo/kl_loss"] >= 0 and "objective/kl" in row
        assert row["rollout/logprob_mismatch_max"] < 1e-5  # the same numerics path
    # the default algorithm, for contrast, keeps a critic and its optimizer state; its update
    # runs trimmed and packed (the loop's PackedUpdate, policy and critic on packed rows),
    # with buckets at 2 per doubling
    ppo_out = tmp_path / "ppo"
    default = [*args[:-5], "ppo.rollout_batch=8", "ppo.minibatch_size=8"]
    switches = ["ppo.trim_update=true", "ppo.pack_update=true", "ppo.buckets_per_doubling=2"]
    assert main([*default, *switches, "--output", str(ppo_out)]) == 0
    names = _saved(ppo_out)
    assert any(n.startswith("critic/params/") for n in names)
    assert any(n.startswith("critic/opt_state/") for n in names)
    rows = _rows(ppo_out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert "ppo/pack_overflow" not in row and row["ppo/value/loss"] > 0
        assert row["rollout/logprob_mismatch_max"] < 1e-4  # packed: other matmul shapes


FORK = '''
import jax.numpy as jnp

from rlhf_jax.advantages import AdvantageOut
from rlhf_jax.ops import masked_mean, masked_sum
from rlhf_jax.registry import declare
from rlhf_jax.types import LossOut


@declare(reads=("advantages", "response_mask", "iteration"))
def reinforce(outputs, batch, scale=1.0):
    """Plain REINFORCE: -E[A log pi], reading the dynamic iteration as well."""
    mask = batch["response_mask"]
    logp = jnp.where(mask != 0, outputs["logprobs"], 0.0)
    loss = -scale * masked_mean(batch["advantages"] * logp, mask)
    return LossOut(loss, {"fork/loss": loss, "fork/iteration": batch["iteration"] * 1.0})


@declare(reads=("rewards", "response_mask"))
def sequence_sign(batch):
    """+1 / -1 on every token by the sign of the sequence's return."""
    mask = batch["response_mask"]
    sign = jnp.sign(masked_sum(batch["rewards"], mask, axis=1))
    return AdvantageOut(sign[:, None] * mask, None, {"fork/positive": jnp.mean(sign > 0)})


def length_reward(prompts, completions, target=3):
    """A verifiable reward over text: closeness of the word count to `target`."""
    return [-abs(len(c.split()) - target) for c in completions]
'''


def test_a_forks_loss_estimator_and_reward_function_run_from_config(run_dir, tmp_path, monkeypatch):
    (tmp_path / "my_fork_algo.py").write_text(textwrap.dedent(FORK))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "fork"
    args = [
        "ppo",
        *SMALL,
        *_inputs(run_dir),  # no reward model: the reward function scores
        "ppo.policy_loss=my_fork_algo:reinforce",
        "ppo.policy_loss_kwargs.scale=2.0",
        "ppo.advantage=my_fork_algo:sequence_sign",
        "ppo.reward_fn=my_fork_algo:length_reward",
        "ppo.reward_fn_kwargs.target=2",
        "ppo.kl_penalty=none",
        "ppo.rollout_batch=8",
        "ppo.minibatch_size=8",
    ]
    assert main([*args, "--output", str(out)]) == 0
    rows = _rows(out)
    assert [r["fork/iteration"] for r in rows] == [0.0, 1.0]
    for row in rows:
        assert "fork/loss" in row and 0.0 <= row["fork/positive"] <= 1.0
        assert row["objective/scores"] <= 0  # -|words - 2| (minus the missing-EOS penalty)
        assert "objective/kl" not in row  # no reference model was kept
    assert (out / "policy" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "override,message",
    [
        ("ppo.advantage=gpro", "unknown advantage estimator 'gpro'"),
        ("ppo.policy_loss=ppo_clipp", "unknown policy loss 'ppo_clipp'"),
        ("ppo.reward_fn=nope", "unknown reward function 'nope'"),
        ("ppo.advantage_kwargs.lamda=0.9", "advantage estimator 'gae' does not take lamda"),
        ("ppo.advantage=rloo", "needs at least 2, got 1"),
        ("ppo.clip_eps=0.1", "has moved: set 'ppo.policy_loss_kwargs.clip_eps'"),
        ("sft.loss=sft_x", "unknown sft loss 'sft_x'"),
    ],
)
def test_names_are_resolved_when_the_config_is_loaded(override, message, tmp_path, capsys):
    """A typo fails before the first stage (pretraining) starts, with the available names."""
    out = tmp_path / "run"
    code = main(["pipeline", "--output", str(out), override])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert message in err, err


def test_a_loss_reading_keys_the_run_lacks_fails_at_load(tmp_path, monkeypatch, capsys):
    (tmp_path / "needs_ref.py").write_text(
        textwrap.dedent(
            """
            from rlhf_jax.types import LossOut

            def kl_only(outputs, batch):
                d = outputs["logprobs"] - batch["ref_logprobs"]
                return LossOut(d.mean(), {"x/loss": d.mean()})
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(
        [
            "pipeline",
            "--output",
            str(tmp_path / "run"),
            "ppo.policy_loss=needs_ref:kl_only",
            "ppo.kl_penalty=none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "reads batch key 'ref_logprobs', which this run does not provide" in err
    assert "ppo.kl_penalty is reward or loss" in err
