"""Where a run executes: the device mesh, its rules, and feeding host batches onto it."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax.config import Config
from rlhf_jax.sharding import (
    activation_rules,
    local_batch_rows,
    make_global_batch,
    make_mesh,
    shard_tree,
)
from rlhf_jax.sharding import model_param_shardings as _model_param_shardings


@dataclasses.dataclass(frozen=True)
class Runtime:
    mesh: Mesh
    rules: dict[str, Any]
    activation_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> Runtime:
        return cls(make_mesh(cfg.mesh), dict(cfg.mesh.rules), dict(cfg.mesh.activation_rules))

    @property
    def activation_rules(self) -> dict[str, Any]:
        """The table the model's activations are constrained by (weights' rules, activation
        defaults, `mesh.activation_rules`): what every jit wrapper is given."""
        return activation_rules(self.rules, self.activation_overrides)

    def param_shardings(self, model_cfg, scalar: bool = False):
        return _model_param_shardings(model_cfg, self.mesh, self.rules, scalar=scalar)

    def place(self, tree, shardings):
        return shard_tree(tree, shardings)

    def global_batch(self, batch: dict[str, np.ndarray], key_name: str, batch_axis: int = 0):
        """The global batch (identical on every process) as arrays split over the batch mesh
        axes; each process contributes only the rows its devices hold."""
        size = next(iter(batch.values())).shape[batch_axis]
        rows = local_batch_rows(size, self.mesh, self.rules, key_name)
        index = np.arange(rows.start, rows.stop)
        local = {k: np.take(v, index, axis=batch_axis) for k, v in batch.items()}
        return make_global_batch(local, self.mesh, self.rules, key_name, batch_axis)

    @property
    def is_single_device(self) -> bool:
        return self.mesh.size == 1 and jax.process_count() == 1
