"""The tiny model and stage sizes the `rlhf-jax plan` tests plan at (tests/loops/test_plan*.py),
written once: tests that plan the same shapes compile the same programs, which the run's shared
XLA cache (tests/conftest.py) then compiles only once."""

CONFIG = "configs/quickstart.yaml"
# A 2-layer, 64-wide model; no pretraining or RM stage to plan.
MODEL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_dim=128",
    "task.vocab_size=512",
    "pretrain.steps=0",
    "rm.steps=0",
]
# SFT and one PPO epoch. Batch sizes divide 8: the suite's workers may run JAX on 1, 4 or 8
# CPU devices.
SMALL = [
    *MODEL,
    "sft.batch_size=8",
    "ppo.rollout_batch=8",
    "ppo.minibatch_size=8",
    "ppo.epochs=1",
    "ppo.max_new_tokens=8",
    "ptx.coef=0",
]
