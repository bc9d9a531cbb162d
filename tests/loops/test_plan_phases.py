"""`rlhf-jax plan` on a PPO stage whose fused experience program sets the peak: the advice for
a switch that shrinks one of its phases (sampling; the reference, reward and critic forwards)
against planning again with the switch applied, both where the forwards set the program's
peak and where the sampler does."""

import json

import pytest
from plan_shapes import CONFIG

from rlhf_jax.cli import main

SCAN = "ppo.decode_layer_scan=true"


def _setup() -> tuple[list[str], str]:
    import jax

    """The plan's overrides, and the micro-batch switch (2 rows per device)."""
    dp = jax.device_count()  # the suite's workers run JAX on 1, 4 or 8 CPU devices
    # A wide gated MLP: its weights, which the unrolled decode path copies once per call
    # (13 MB a layer), weigh more than the forwards' activations over 2 rows and less than
    # over 16. LoRA, remat and micro-batches keep the update below the experience.
    return [
        "model.d_model=256",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.mlp_dim=4096",
        "task.vocab_size=512",
        "model.remat=true",
        "lora.rank=4",
        "pretrain.steps=0",
        "sft.steps=0",
        "rm.steps=0",
        "ptx.coef=0",
        "ppo.critic=shared_trunk",
        "ppo.ema_decay=0",
        "ppo.epochs=1",
        f"ppo.rollout_batch={16 * dp}",
        f"ppo.minibatch_size={8 * dp}",
        "ppo.policy_optim.grad_accum=4",
        "ppo.max_prompt_len=32",
        "ppo.max_new_tokens=32",
    ], f"ppo.experience_micro_batch={2 * dp}"


def _ppo(capsys, *args: str) -> dict:
    assert main(["plan", "--config", CONFIG, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["stages"]["ppo"]


def _offered(stage: dict) -> dict[str, int]:
    return {s["switch"]: s["peak_bytes_per_device"] for s in stage["suggestions"]}


def test_a_phase_switch_lowers_the_fused_experience_only_to_the_other_phase(capsys):
    base, micro = _setup()
    first = _ppo(capsys, *base)
    assert max(first["programs"], key=first["programs"].get) == "experience"
    offered = _offered(first)
    # The forwards over all 16 rows set the experience's peak: scanning the layers in the
    # sampler saves nothing (the advice promised the copy, 27 MB, before the planner compiled
    # the phases alone), and micro-batching the forwards lowers it down to the sampler's.
    assert SCAN not in offered
    again = _ppo(capsys, *base, micro)
    assert offered[micro] == pytest.approx(again["peak_bytes_per_device"], rel=0.1)
    assert max(again["programs"], key=again["programs"].get) == "experience"
    # Micro-batched, the sampler sets the experience's peak: now the layer scan saves.
    promised = _offered(again)[SCAN]
    assert promised < again["peak_bytes_per_device"]
    both = _ppo(capsys, *base, micro, SCAN)
    assert promised == pytest.approx(both["peak_bytes_per_device"], rel=0.1)
