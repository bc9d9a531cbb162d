"""Parts of every kind that record the batch keys they are handed and then do what the
built-in default does; chosen from config as `fork_key_probes:<kind>` (no registration, no
library edit). SEEN[kind]: one (keys, traced) per call: `traced` when called inside a
compiled program (a real run's step), not by the load-time dry run on sample arrays."""

import jax
import numpy as np

from rlhf_jax import registry

SEEN: dict[str, list[tuple[frozenset, bool]]] = {}

DEFAULTS = {"sft": "sft_cross_entropy", "reward": "kwise_ranking", "ptx": "pretrain_nll",
            "policy": "ppo_clip", "value": "clipped_value", "advantage": "gae",
            "preference": "dpo"}  # fmt: skip


def _seen(kind: str, batch) -> None:
    traced = any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(dict(batch)))
    SEEN.setdefault(kind, []).append((frozenset(batch), traced))


def _loss(kind: str):
    def loss(outputs, batch):
        _seen(kind, batch)
        return registry.lookup(kind, DEFAULTS[kind])(outputs, batch)

    loss.__name__ = kind
    return loss


sft, reward, ptx, policy, value = (_loss(k) for k in ("sft", "reward", "ptx", "policy", "value"))


def preference(outputs, batch, beta: float = 0.1):
    _seen("preference", batch)
    return registry.lookup("preference", "dpo")(outputs, batch, beta=beta)


def advantage(batch):
    _seen("advantage", batch)
    return registry.lookup("advantage", "gae")(batch)


def group_advantage(batch):
    _seen("advantage", batch)
    return registry.lookup("advantage", "grpo")(batch)


registry.declare(min_group_size=2)(group_advantage)
registry.declare(needs_critic=True)(advantage)


def rollout_filter(batch):
    """Keeps every response; called on the host (never traced): a real call is one whose
    batch is not the dry run's 4 sample rows."""
    SEEN.setdefault("rollout_filter", []).append((frozenset(batch), len(batch["scores"]) != 4))
    return np.ones(len(batch["scores"]), bool)
