"""Host-level exchanges between the processes of a multi-host run: a barrier, a gather and a
broadcast, each preceded by every process arriving at the coordination service.

Why the arrival: JAX's host gathers (`multihost_utils.process_allgather`, the barrier
`sync_global_devices`) are small device collectives. On CPU (gloo) the first collective of a
group of devices opens a connection between the processes that waits 30 seconds for the
others, a limit no setting changes. These exchanges follow uneven host work (one process
still tokenizing its rows, writing a data file, or importing under load), and a loaded CI
run once failed there: `Gloo context initialization failed: ... GetKeyValue() timed out ...
30s` in a 2-process `rlhf-jax sft`, the other process not yet done encoding. Waiting first at
the coordination service's barrier, whose limit is ours (`ARRIVAL_TIMEOUT_S`), puts every
process into the collective together. A process that died is reported by the coordination
service's heartbeat, not by this limit.

Every process must make the same sequence of these calls (as with any collective).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax

ARRIVAL_ENV = "RLHF_JAX_ARRIVAL_TIMEOUT_S"
ARRIVAL_TIMEOUT_S = 3600  # an hour: longer than any host work between two exchanges
_count = itertools.count()


def _coordination_client():
    """The coordination service's client of `jax.distributed.initialize` (jax's own
    serialization and orbax wait at its barriers the same way), or None."""
    try:
        from jax._src import distributed
    except ImportError:  # moved in a later jax: fall back to the collectives alone
        return None
    return getattr(distributed.global_state, "client", None)


def arrive(name: str) -> None:
    """Return once every process has called `arrive` as often as this one (a barrier of the
    coordination service; no device is involved). One process: returns at once."""
    if jax.process_count() == 1:
        return
    client = _coordination_client()
    if client is None:
        return
    timeout_s = int(os.environ.get(ARRIVAL_ENV) or ARRIVAL_TIMEOUT_S)
    # Barrier ids must not repeat; every process counts its calls the same way.
    client.wait_at_barrier(f"rlhf_jax/{next(_count)}/{name}", timeout_in_ms=timeout_s * 1000)


def gather(x: Any, name: str, *, tiled: bool = False) -> Any:
    """`multihost_utils.process_allgather(x, tiled=tiled)` after every process arrived."""
    from jax.experimental import multihost_utils

    arrive(name)
    return multihost_utils.process_allgather(x, tiled=tiled)


def broadcast_from_first(x: Any, name: str) -> Any:
    """Process 0's `x` on every process (`multihost_utils.broadcast_one_to_all`), after every
    process arrived."""
    from jax.experimental import multihost_utils

    arrive(name)
    return multihost_utils.broadcast_one_to_all(x)
