"""The device mesh: three named axes over every device of the run.

`data` splits the batch (weights replicated), `fsdp` splits the batch AND the weights' `embed`
dimension (ZeRO-3 style: weights are all-gathered for use, gradients reduce-scattered), `tensor`
splits heads / MLP / vocabulary inside each layer (Megatron style). Which weight dimension goes
to which axis is decided by the logical-axis rules (`rules.py`), never here or in the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from rlhf_jax.config import MeshConfig
from rlhf_jax.errors import RlhfJaxError

# Order matters: the last axis varies fastest over the device list, so `tensor` (the most
# communication per step) stays inside a host / ICI neighbourhood and `data` spans hosts.
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the -1 axis resolved; RlhfJaxError if they cannot cover
    exactly `n_devices`."""
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    given = " x ".join(f"mesh.{k}={v}" for k, v in sizes.items())
    if free:
        if n_devices % fixed:
            raise RlhfJaxError(
                f"config section 'mesh': {given}: the fixed axes ({fixed} devices) do not "
                f"divide the {n_devices} devices of this run, so mesh.{free[0]}=-1 cannot "
                "take the rest"
            )
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise RlhfJaxError(
            f"config section 'mesh': {given} = {fixed} devices, but this run has {n_devices}; "
            "make the product equal the device count, or set one axis to -1"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh ("data", "fsdp", "tensor") over `devices` (default: every global device,
    `jax.devices()`, so on several hosts it spans all processes).

    Axis types are Auto: shardings are given by `jit`'s in/out shardings and propagated by
    the compiler, so the model code needs no sharding annotations.
    Multi-slice TPU runs put the slices (slow DCN links) on the `data` axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:
        if shape[0] % n_slices:
            raise RlhfJaxError(
                f"config key 'mesh.data': {shape[0]} must be a multiple of the {n_slices} "
                "TPU slices (data parallelism runs across slices)"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // n_slices, shape[1], shape[2]), (n_slices, 1, 1), devices
        )
        return Mesh(np.asarray(grid), MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
