"""Typed run configuration: sections in `schema`, YAML + overrides in `loader`."""

from rlhf_jax.config.loader import apply_overrides, from_dict, load_config, to_dict
from rlhf_jax.config.schema import (
    DEFAULT_RULES,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    MeshConfig,
    ModelSpec,
    OptimConfig,
    PPOConfig,
    PretrainConfig,
    PtxConfig,
    RMConfig,
    SFTConfig,
    TaskConfig,
)

__all__ = [
    "DEFAULT_RULES",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LogConfig",
    "MeshConfig",
    "ModelSpec",
    "OptimConfig",
    "PPOConfig",
    "PretrainConfig",
    "PtxConfig",
    "RMConfig",
    "SFTConfig",
    "TaskConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]
