"""The smallest program that shows XLA:CPU's collective abort on simulated devices (see
docs/distributed.md, "8 simulated CPU devices: the rendezvous abort"):

    python cpu_rendezvous_script.py DEVICES STEPS LAG

One jitted FSDP-style step (a `lax.scan` over 4 layers whose weights are sharded on their
input dimension, so every layer all-gathers its weight; the loss all-reduces) is dispatched
STEPS times. LAG bounds how many steps are in flight: after dispatching step i the host reads
the loss of step i - LAG + 1 (LAG=1: every step waits for the previous; LAG=0: never, the
host queues every step at once). The program is the same on every device, with no host
callback, no `cond` and no data-dependent control flow around its collectives.

Measured on a 2-core machine (jax 0.10.2): LAG=0 aborts at 8 and at 16 devices (`Termination
timeout ... Expected 8 threads to join the rendezvous, but only 7 of them arrived on time`,
after 40 s) and runs at 4; LAG=1, 2 and 3 run 300 steps at 8 devices. Prints `done` and the
final loss when it finishes.
"""

import os
import sys

devices, steps, lag = (int(a) for a in sys.argv[1:4])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

DIM, LAYERS = 256, 4
mesh = Mesh(jax.devices(), ("fsdp",))
w = jax.device_put(
    jnp.ones((LAYERS, DIM, DIM), jnp.float32) / DIM, NamedSharding(mesh, P(None, "fsdp", None))
)
x = jax.device_put(jnp.ones((8 * devices, DIM), jnp.float32), NamedSharding(mesh, P("fsdp")))


def loss_fn(w, x):
    def layer(h, w_layer):
        return jnp.tanh(h @ w_layer), None

    return jnp.mean(jax.lax.scan(layer, x, w)[0] ** 2)


@jax.jit
def step(w, x):
    loss, grad = jax.value_and_grad(loss_fn)(w, x)
    return w - 1e-3 * grad, loss


losses = []
for i in range(steps):
    w, loss = step(w, x)
    losses.append(loss)
    if lag and i >= lag - 1:
        float(losses[i - lag + 1])
print("done", float(losses[-1]), flush=True)
