"""The devices a plan is made for: how many (real, or virtual CPU devices for `--devices N`)
and how much memory each has.

Why virtual CPU devices: XLA's memory analysis exists only for a *compiled* program, and
compiling needs a concrete device assignment. `jax.sharding.AbstractMesh` lowers a sharded
program without devices, but `.compile()` then refuses ("device_assignment cannot be None").
JAX's CPU backend can instead present N devices in one process (`jax_num_cpu_devices`, read
when the backend starts), and the SPMD partitioner then compiles the per-device program of an
N-device mesh exactly as it would for N accelerators: the weights' shards, the batch's rows
and the collectives are those of the real mesh. What differs is the backend's compiler (fusion
and buffer reuse of XLA:CPU instead of XLA:GPU/TPU), see docs/memory.md.
"""

from __future__ import annotations

import os
import re

from rlhf_jax.errors import RlhfJaxError

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# A device's memory is never outside these: a value outside is a slip (a unit forgotten or
# mistyped), refused rather than planned against.
MIN_DEVICE_MEMORY, MAX_DEVICE_MEMORY = 2**20, 2**50


def parse_bytes(text: str) -> int:
    """`"80GB"` (10^9), `"80GiB"` (2^30), `"512MiB"`, `"1.5e9B"` -> bytes. The unit is
    required: a bare `80` is ambiguous (80 bytes? 80 GB? GiB?) and was once taken as bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or (m.group(2) and m.group(2) not in _UNITS):
        raise RlhfJaxError(
            f"--device-memory: {text!r} is not a size; write e.g. 80GB, 80GiB or 512MiB"
        )
    if not m.group(2):
        raise RlhfJaxError(
            f"--device-memory: {text!r} has no unit; write {m.group(1)}GB (10^9 bytes), "
            f"{m.group(1)}GiB (2^30 bytes), or {m.group(1)}B for bytes"
        )
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not MIN_DEVICE_MEMORY <= value <= MAX_DEVICE_MEMORY:  # also inf (1e999GB)
        raise RlhfJaxError(
            f"--device-memory: {text!r} is not a device's memory; give between 1MiB and 1024TiB"
        )
    return int(value)


def use_virtual_devices(n: int) -> None:
    """Plan for `n` devices: the CPU backend with `n` devices. Must run before JAX starts its
    backends (the CLI calls it first thing); a process whose backends already run keeps its
    devices, which is fine only if there are `n` CPU devices already."""
    if n < 1:
        raise RlhfJaxError(f"--devices must be >= 1, got {n}")
    import jax

    try:  # refused once the backends run: then only check what they have
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    except (RuntimeError, ValueError):
        pass
    devices = jax.devices()
    if len(devices) != n or devices[0].platform != "cpu":
        raise RlhfJaxError(
            f"--devices {n}: this process already runs JAX on {len(devices)} "
            f"{devices[0].platform} device(s); run `rlhf-jax plan` in a fresh process"
        )


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(given: int | None) -> tuple[int, str]:
    """`(bytes per device, where the number came from)`: the `--device-memory` value when
    given (to plan for another card than this one), else the allocator's limit of device 0
    (GPU/TPU: what JAX will let a program use, after its preallocation fraction), else, on
    CPU, the host's memory shared by its devices."""
    if given is not None:
        return given, "--device-memory"
    import jax

    devices = jax.local_devices()
    stats = devices[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{devices[0].device_kind} allocator limit"
    share = host_memory_bytes() // len(devices)
    where = "host RAM" if len(devices) == 1 else f"host RAM / {len(devices)} devices"
    return share, f"{where}; give --device-memory to plan for an accelerator"
