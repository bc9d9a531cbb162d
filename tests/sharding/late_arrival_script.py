"""One process of a 2-process CPU run started by test_late_arrival.py: process 1 reaches a
host gather LATE_S seconds after process 0 (as after uneven host work: tokenizing its rows,
writing a file), then both print what they gathered. CONTROL=1 gathers with JAX's own
`process_allgather` alone, without `rlhf_jax.processes`' arrival barrier."""

import os
import time

os.environ["JAX_PLATFORMS"] = "cpu"

from rlhf_jax.config import DistributedConfig  # noqa: E402
from rlhf_jax.sharding import initialize  # noqa: E402

initialize(DistributedConfig())

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from result_line import emit  # noqa: E402

from rlhf_jax import processes  # noqa: E402

if jax.process_index() == 1:
    time.sleep(float(os.environ["LATE_S"]))
mine = np.int64(jax.process_index() + 1)
if os.environ.get("CONTROL") == "1":
    out = multihost_utils.process_allgather(mine)
else:
    out = processes.gather(mine, "late arrival")
emit({"gathered": np.asarray(out).tolist()})
