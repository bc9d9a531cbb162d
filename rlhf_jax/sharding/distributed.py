"""Joining the processes of a multi-host run into one JAX runtime.

`initialize` must run first thing in every process, before any JAX call that touches devices
(`jax.devices()`, creating an array, jit): the device list of a multi-process run only exists
after `jax.distributed.initialize`, and JAX refuses to initialise once a backend is up.
"""

from __future__ import annotations

import os

import jax

from rlhf_jax.config import DistributedConfig
from rlhf_jax.errors import RlhfJaxError

# Environment variables set by Cloud TPU pods (GKE, multi-slice); plain TPU VMs are found by
# their PCI devices instead (see `_on_cloud_tpu`).
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID")
HEARTBEAT_ENV = "RLHF_JAX_HEARTBEAT_TIMEOUT_S"


def _int_setting(value: int | str | None, key: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RlhfJaxError(f"{key}: {value!r} is not an integer") from None


def _on_cloud_tpu() -> bool:
    if any(os.environ.get(name) for name in _TPU_POD_ENV):
        return True
    try:  # the PCI scan JAX itself uses to spot TPU chips; initialises no backend
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # private helper gone or unreadable /sys: rely on the variables
        return False


def resolve(cfg: DistributedConfig) -> tuple[str | None, int | None, int | None]:
    """(coordinator_address, num_processes, process_id): each from the config, else from
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
    env = os.environ
    address = cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if cfg.num_processes is not None:
        n = _int_setting(cfg.num_processes, "config key 'distributed.num_processes'")
    else:
        n = _int_setting(env.get("JAX_NUM_PROCESSES"), "environment variable JAX_NUM_PROCESSES")
    if cfg.process_id is not None:
        pid = _int_setting(cfg.process_id, "config key 'distributed.process_id'")
    else:
        pid = _int_setting(env.get("JAX_PROCESS_ID"), "environment variable JAX_PROCESS_ID")
    return address, n, pid


def initialize(cfg: DistributedConfig) -> bool:
    """Start the multi-process runtime when the run spans processes; True if it did.

    In order: coordinator, process count and id from config or the JAX_* variables; else on
    a Cloud TPU VM, `jax.distributed.initialize()` discovers the pod itself; else this is a
    single-process run and nothing happens. Calling it again is a no-op. On CPU, processes
    exchange collectives over gloo (set before initialising, as JAX requires).
    """
    if jax.distributed.is_initialized():
        return True
    address, n, pid = resolve(cfg)
    if address is None and n is None and pid is None:
        if not _on_cloud_tpu():
            return False
        jax.distributed.initialize(**heartbeat_setting(cfg))
        return True
    missing = [
        key
        for key, value in (
            ("coordinator_address (JAX_COORDINATOR_ADDRESS)", address),
            ("num_processes (JAX_NUM_PROCESSES)", n),
            ("process_id (JAX_PROCESS_ID)", pid),
        )
        if value is None
    ]
    if missing:
        raise RlhfJaxError(
            "config section 'distributed': a multi-process run needs all three of "
            f"coordinator_address, num_processes and process_id; missing {', '.join(missing)}"
        )
    if n < 1 or not 0 <= pid < n:
        raise RlhfJaxError(
            f"config section 'distributed': process_id={pid} must be in 0..num_processes-1 "
            f"(num_processes={n})"
        )
    if n == 1:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=n,
        process_id=pid,
        **heartbeat_setting(cfg),
    )
    return True


def heartbeat_setting(cfg: DistributedConfig) -> dict[str, int]:
    """`heartbeat_timeout_seconds` for `jax.distributed.initialize` from
    `distributed.heartbeat_timeout_s`, else RLHF_JAX_HEARTBEAT_TIMEOUT_S; empty (JAX's own
    default) when neither is set."""
    if cfg.heartbeat_timeout_s is not None:
        seconds = _int_setting(
            cfg.heartbeat_timeout_s, "config key 'distributed.heartbeat_timeout_s'"
        )
    else:
        seconds = _int_setting(
            os.environ.get(HEARTBEAT_ENV), f"environment variable {HEARTBEAT_ENV}"
        )
    if seconds is None:
        return {}
    if seconds < 1:
        raise RlhfJaxError(f"distributed.heartbeat_timeout_s must be >= 1 second, got {seconds}")
    return {"heartbeat_timeout_seconds": seconds}
