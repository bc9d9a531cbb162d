"""host_memory: with freed memory kept, a jitted call reuses its temporaries instead of having
the kernel fault them in again at every call (counted as minor page faults, in a fresh
process each: malloc's settings are per process and must precede the CPU backend)."""

import os
import subprocess
import sys
import textwrap

import pytest

from rlhf_jax import host_memory

PROBE = textwrap.dedent(
    """
    import resource, sys
    if sys.argv[1] == "keep":
        from rlhf_jax.host_memory import keep_freed_host_memory
        assert keep_freed_host_memory()
    import jax, jax.numpy as jnp

    @jax.jit
    def step(x):
        # 16 x 1M float32 stacked by the scan: a 64 MiB temporary, read back by the sum
        _, ys = jax.lax.scan(lambda c, _: (c + 1.0, jnp.sin(c)), x, None, length=16)
        return jnp.sum(ys * ys, axis=0)

    x = jnp.ones((1 << 20,), jnp.float32)
    step(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
    """
)
TEMP_PAGES = 64 * 2**20 // 4096


def faults_per_call(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_SYSTEM_MALLOC"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc only")
def test_kept_memory_is_not_faulted_in_again():
    default, kept = faults_per_call("default"), faults_per_call("keep")
    assert default >= TEMP_PAGES, "the probe's temporary should be faulted in at every call"
    assert kept <= default / 3, (kept, default)


def test_accelerator_or_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory.runs_on_cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu_only()
    monkeypatch.setattr(host_memory, "_applied", None)
    monkeypatch.setenv("RLHF_JAX_SYSTEM_MALLOC", "1")
    assert host_memory.keep_freed_host_memory() is False
