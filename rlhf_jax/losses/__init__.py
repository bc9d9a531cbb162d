"""Swappable losses, chosen by (kind, name) from config. Importing this package registers the
built-in ones; `get_loss(kind, "package.module:function")` loads a fork's own."""

from rlhf_jax.losses.policy import ppo_clip, ppo_dual_clip
from rlhf_jax.losses.preference import dpo, ipo, robust_dpo
from rlhf_jax.losses.ptx import pretrain_nll
from rlhf_jax.losses.registry import KINDS, get_loss, register_loss, registered_losses
from rlhf_jax.losses.reward import kwise_ranking, pairwise_mean
from rlhf_jax.losses.sft import sft_cross_entropy, sft_sequence_mean
from rlhf_jax.losses.value import clipped_value, unclipped_value

__all__ = [
    "KINDS",
    "clipped_value",
    "dpo",
    "get_loss",
    "ipo",
    "kwise_ranking",
    "pairwise_mean",
    "ppo_clip",
    "ppo_dual_clip",
    "pretrain_nll",
    "register_loss",
    "registered_losses",
    "robust_dpo",
    "sft_cross_entropy",
    "sft_sequence_mean",
    "unclipped_value",
]
