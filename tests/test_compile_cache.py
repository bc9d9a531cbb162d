"""The suite's persistent XLA compilation cache (tests/conftest.py): a program compiled in a
test process is loaded, not compiled, by a subprocess the test starts, and the loaded
executable computes bitwise what the freshly compiled one did."""

import os
import sys
import textwrap
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from processes import run

# A float32 matmul, tanh, reductions and a softmax: enough instructions that a differently
# compiled program could round differently. SALT makes the program this test's own, so its
# cache entry cannot come from another test.
PROGRAM = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np

    def program(x, salt):
        h = jnp.tanh(x @ x.T * salt)
        return jax.nn.softmax(h, axis=-1) @ x + h.sum(0)[:, None]

    def inputs():
        return np.random.default_rng(0).normal(size=(24, 40)).astype(np.float32)

    def named(fn, name):
        fn.__name__ = name  # the cache entry's file name starts with jit_<name>
        return fn
    """
)
CHILD = PROGRAM + textwrap.dedent(
    """
    events = []
    jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
    salt, name = float(sys.argv[1]), sys.argv[2]
    out = np.asarray(jax.jit(named(lambda x: program(x, salt), name))(inputs()))
    print(events.count("/jax/compilation_cache/cache_hits"), out.tobytes().hex())
    """
)


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith("-cache")}


def test_a_subprocess_loads_what_the_test_compiled_and_computes_the_same_bits():
    folder = Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    assert jax.config.jax_compilation_cache_dir == str(folder)  # this process uses it too
    salt = 1.0 + uuid.uuid4().int % 1000 / 1e4
    namespace: dict = {}
    exec(PROGRAM, namespace)
    # A name of its own: the other xdist worker writes its own entries into the same folder
    # meanwhile (a concurrent `jit__argmax` made this count 2 once), so only ours are counted.
    name = f"cache_probe_{uuid.uuid4().hex[:12]}"
    fn = namespace["named"](lambda x: namespace["program"](x, salt), name)
    fresh = np.asarray(jax.jit(fn)(namespace["inputs"]()))
    ours = {e for e in _entries(folder) if e.startswith(f"jit_{name}-")}
    assert len(ours) == 1, "the compiled program was not written"
    assert fresh.dtype == jnp.float32 and np.isfinite(fresh).all()

    child = run([sys.executable, "-c", CHILD, repr(salt), name])  # inherits the cache's environment
    assert child.returncode == 0, child.stderr[-3000:]
    hits, bits = child.stdout.split()
    assert hits == "1", "the subprocess compiled the program again instead of loading it"
    assert bits == fresh.tobytes().hex()
