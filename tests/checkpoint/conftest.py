"""Shared tiny SFT setup: compiling the step dominates these tests, so it is done once."""

import pytest


@pytest.fixture(scope="session")
def sft():
    """`(config, params, tx, step)`: a tiny model on device 0 (committed, as restored arrays
    are, so one compiled step serves original and restored states) and its jitted SFT step."""
    import jax
    from tiny import tiny_config

    from rlhf_jax.config import OptimConfig
    from rlhf_jax.losses import get_loss
    from rlhf_jax.models import init_params
    from rlhf_jax.steps import make_optimizer, make_sft_step

    config = tiny_config()
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))  # faster than eager
    params = jax.device_put(params, jax.devices()[0])
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2), 20)
    return config, params, tx, jax.jit(make_sft_step(config, get_loss("sft")))
