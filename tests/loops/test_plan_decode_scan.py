"""`rlhf-jax plan` offers `ppo.decode_layer_scan=true` when the sampler's per-call copy of
the layers' weights sets the peak, with the layers' weights as its saving."""

import json

from rlhf_jax.cli import main

# Wide layers, few short rows: the weights dominate the sampler's temporaries.
WIDE = [
    "model.d_model=256",
    "model.n_layers=3",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_dim=1024",
    "task.vocab_size=512",
    "pretrain.steps=0",
    "sft.steps=0",
    "rm.steps=0",
    "ppo.rollout_batch=8",
    "ppo.minibatch_size=8",
    "ppo.epochs=1",
    "ppo.max_new_tokens=8",
    "ptx.coef=0",
    # LoRA and the shared-trunk critic keep the update small: the sampler sets the peak.
    "lora.rank=16",
    "ppo.critic=shared_trunk",
]


def test_the_plan_offers_the_layer_scan_with_the_layers_weights_as_its_saving(capsys):
    assert main(["plan", "--config", "configs/quickstart.yaml", *WIDE, "--json"]) == 0
    ppo = json.loads(capsys.readouterr().out)["stages"]["ppo"]
    offered = [s for s in ppo["suggestions"] if s["switch"] == "ppo.decode_layer_scan=true"]
    assert offered, [s["switch"] for s in ppo["suggestions"]]
    # By hand: q (256 x 256), k and v (256 x 128 each), o (256 x 256), gate, up and down
    # (256 x 1024 each), float32, 3 layers.
    layers = 3 * 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024)
    assert 0 < offered[0]["saves_bytes"] <= layers
