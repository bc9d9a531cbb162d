"""LoRA through the CLI: RL with an adapted policy and critic checkpoints only what trains,
resumes exactly, samples and trains on one numerics path, and writes a plain model."""

import json

import numpy as np
from safetensors.numpy import load_file
from test_algorithms import _rows, _saved
from test_resume import SMALL, _interrupted_and_whole, _metrics, _same_weights

from rlhf_jax.cli import main

# These runs set ptx.coef=0, so a ptx setting would be refused as one the run never reads.
SMALL_NO_PTX = [arg for arg in SMALL if not arg.startswith("ptx.")]
LORA = ["lora.rank=4", "lora.alpha=8", "lora.models=[policy,critic]", "lora.save_adapters=true"]


def test_lora_ppo_trains_adapters_only_resumes_exactly_and_saves_a_plain_model(
    run_dir, tmp_path, capsys
):
    data = run_dir / "data"
    command = [
        "ppo",
        *SMALL_NO_PTX,
        *LORA,
        "ppo.iterations=4",
        "ptx.coef=0",
        "checkpoint.save_every=1",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
    ]
    paused, whole = _interrupted_and_whole(command, 2, tmp_path, capsys)
    assert _metrics(paused, "ppo") == _metrics(whole, "ppo")
    _same_weights(paused / "policy" / "model.safetensors", whole / "policy" / "model.safetensors")

    # Checkpoints: the policy's adapters and their moments; the critic's adapters and head.
    names = _saved(whole)
    policy = [n for n in names if n.startswith(("policy/", "ema_params/"))]
    weights = [n for n in policy if "/params/" in n or "/mu/" in n or "/nu/" in n]
    assert weights and all("lora_" in n for n in weights), weights
    assert all("lora_" in n for n in policy if n.startswith("ema_params/"))
    base = ("kernel", "scale", "bias", "embed", "lm_head")
    assert not [n for n in policy if n.endswith(base)]  # no base weight, nor its moments
    critic = [n.split("/params/")[1] for n in names if n.startswith("critic/params/")]
    assert critic and all(n.startswith("head/") or "lora_" in n for n in critic), critic
    assert any(n.startswith("head/") for n in critic)

    for row in _rows(whole):
        assert row["rollout/logprob_mismatch_max"] < 1e-5  # sampler and trainer agree
        assert row["ppo/policy/skipped_updates"] == 0

    # The written policy is a plain model (no adapter tensors) that moved away from SFT.
    sft, trained = (
        load_file(run_dir / "sft" / "model.safetensors"),
        load_file(whole / "policy" / "model.safetensors"),
    )
    assert sft.keys() == trained.keys()
    moved = [k for k in sft if not np.array_equal(sft[k], trained[k])]
    assert moved and all("proj" in k for k in moved), moved  # only adapted projections

    # The adapters alone, for PEFT (tests/models/test_lora.py loads such a folder in PEFT).
    adapter = whole / "policy_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    names = load_file(adapter / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names

    # Another rank is another run: refused, not silently resumed.
    capsys.readouterr()
    assert main([*command, "lora.rank=8", "--output", str(whole)]) == 2
    assert "lora.rank: 4 -> 8" in capsys.readouterr().err


def test_value_head_on_the_policy_trunk_replaces_the_critic(run_dir, tmp_path):
    """`ppo.critic=shared_trunk` (here with a LoRA policy): no critic model, weights or
    optimizer; the value head trains with the policy and is left out of the saved policy."""
    data = run_dir / "data"
    out = tmp_path / "shared"
    args = [
        "ppo",
        *SMALL_NO_PTX,
        "lora.rank=4",
        "ppo.critic=shared_trunk",
        "ppo.iterations=2",
        "ptx.coef=0",
        "checkpoint.save_every=1",
        f"ppo.policy={run_dir / 'sft'}",
        f"ppo.reward_model={run_dir / 'rm'}",
        f"ppo.prompts={data / 'ppo_prompts.jsonl'}",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    names = _saved(out)
    assert not [n for n in names if n.startswith("critic")], names
    assert "policy/params/value_head/kernel" in names
    assert any(n.startswith("policy/opt_state/") and "value_head" in n for n in names)
    for row in _rows(out):
        assert row["rollout/logprob_mismatch_max"] < 1e-5
        assert np.isfinite(row["ppo/value/explained_variance"])
        assert "ppo/value/skipped_updates" not in row  # one optimizer for policy and head
    sft = load_file(run_dir / "sft" / "model.safetensors")
    assert load_file(out / "policy" / "model.safetensors").keys() == sft.keys()


def test_shared_trunk_needs_an_estimator_with_a_critic(run_dir, tmp_path, capsys):
    args = ["ppo", "--output", str(tmp_path / "x"), "ppo.critic=shared_trunk"]
    assert main([*args, "ppo.advantage=rloo", "ppo.samples_per_prompt=2"]) == 2
    assert "shared_trunk puts a value head on the policy" in capsys.readouterr().err
    assert main([*args, "lora.rank=4", "lora.models=[policy,critic]"]) == 2
    assert "'critic' has no model of its own" in capsys.readouterr().err


def test_lora_sft_resumes_exactly_with_its_base_read_in_place(run_dir, tmp_path, capsys):
    """A supervised LoRA stage: the base is its own (never donated) argument of the step,
    the checkpoints hold only what trains, and a paused run ends bitwise like a whole one."""
    data = run_dir / "data"
    command = [
        "sft",
        *SMALL,
        *LORA,
        "sft.steps=4",
        f"model.path={run_dir / 'sft'}",
        f"sft.data={data / 'sft.jsonl'}",
    ]
    paused, whole = _interrupted_and_whole(command, 2, tmp_path, capsys)
    assert _metrics(paused, "sft") == _metrics(whole, "sft")
    _same_weights(paused / "sft" / "model.safetensors", whole / "sft" / "model.safetensors")
    _same_weights(
        paused / "sft_adapter" / "adapter_model.safetensors",
        whole / "sft_adapter" / "adapter_model.safetensors",
    )
