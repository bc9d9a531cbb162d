"""Attention paths on this machine: dense vs blocked, and decode over the filled cache only.

Table 1: one causal attention, forward + backward (the gradient of a sum w.r.t. q, k, v),
at the 1B Llama's head shape (32 query heads, 8 kv heads, head dim 64), batch 1, float32:
CPU time of the fastest timed call and the compiled program's temporaries (XLA's memory
analysis), for the dense path (`jax.nn.dot_product_attention` over a [B, 1, T, T] mask)
and the blocked one. It is what `models/attention.DENSE_BELOW` is chosen from.

Table 2: one decode step (`forward_cached`, T = 1, jitted) of a model with a KV cache of
`slots` slots, at a given number of filled slots, reading every allocated slot (what
generation did before buckets) vs only the power-of-two bucket holding the filled ones.

    python -m bench.attention [--size tiny|full] [--out PATH|-]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Table, blocked, parser, publish
from rlhf_jax.models import attention
from rlhf_jax.models.attention import KeyMask, blocked_self_attention, dense_mask
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import forward_cached, init_cache, init_params

ATT_COLUMNS = ("T", "dense CPU ms", "blocked CPU ms", "blocked / dense", "dense MiB", "blocked MiB")
DECODE_COLUMNS = ("slots", "filled", "all slots CPU ms", "bucket CPU ms", "bucket / all")


def cpu_ms(sides: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Fewest CPU milliseconds (all threads of this process, `time.process_time`) of one call
    per side, sides interleaved: on a shared machine other processes' load inflates wall
    time, much less the CPU time this process spends."""
    for _ in range(warmup + 1):
        for fn in sides.values():
            fn()
    best = {name: float("inf") for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], (time.process_time() - start) * 1e3)
    return best


def _attention_sides(t: int, heads: int, kv: int, e: int):
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(1, t, heads, e)), jnp.float32)
    k = jnp.asarray(r.normal(size=(1, t, kv, e)), jnp.float32)
    v = jnp.asarray(r.normal(size=(1, t, kv, e)), jnp.float32)
    mask = KeyMask(jnp.ones((1, t), jnp.int32))

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=dense_mask(mask, t))

    def grad_of(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))

    fns = {
        "dense": grad_of(dense),
        "blocked": grad_of(lambda q, k, v: blocked_self_attention(q, k, v, mask)),
    }
    mib = {
        n: f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
        for n, f in fns.items()
    }
    return {n: blocked(lambda f=f: f(q, k, v)) for n, f in fns.items()}, mib


def attention_table(lengths, heads, kv, e, warmup, repeats) -> Table:
    table = Table(
        f"Causal attention forward + backward, {heads} heads / {kv} kv heads / head dim {e}, "
        "batch 1, float32",
        ATT_COLUMNS,
    )
    for t in lengths:
        sides, mib = _attention_sides(t, heads, kv, e)
        ms = cpu_ms(sides, warmup, repeats)
        d, b = ms["dense"], ms["blocked"]
        table.add(t, d, b, b / d, mib["dense"], mib["blocked"])
    return table


def decode_steps(config: ModelConfig, params, batch: int, slots: int) -> dict:
    """One compiled decode step (T = 1) per side: "all" reads every allocated slot (the code
    generation ran before buckets: MIN_BUCKET = slots gives one bucket), "bucket" the
    power-of-two bucket holding the filled slots. Each takes (params, cache, index) and
    returns the cache, which it donates: fed back, as the decode loop carries it, a step
    writes its slot in place instead of copying the whole cache."""
    ids = jnp.zeros((batch, 1), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(config, batch, slots))
    kv_mask = jnp.ones((batch, slots), jnp.int32)
    default = attention.MIN_BUCKET
    compiled = {}
    try:
        for name, min_bucket in (("all", slots), ("bucket", default)):
            attention.MIN_BUCKET = min_bucket  # read while the step is traced
            fn = jax.jit(
                lambda p, c, i: forward_cached(config, p, ids, i[None, None], c, kv_mask, i)[1],
                donate_argnums=1,
            )
            # The executable itself: calling `fn` later would trace again with MIN_BUCKET.
            compiled[name] = fn.lower(params, cache, jnp.int32(0)).compile()
    finally:
        attention.MIN_BUCKET = default
    return compiled


def decode_table(config: ModelConfig, batch: int, slots: int, filled, warmup, repeats) -> Table:
    params = init_params(config, jax.random.key(0))
    table = Table(
        f"Decode step, {config.n_layers}L/{config.d_model}d, {config.n_heads} heads / "
        f"{config.n_kv_heads} kv heads, vocab {config.vocab_size}, batch {batch}, float32",
        DECODE_COLUMNS,
    )
    fns = decode_steps(config, params, batch, slots)
    caches = {k: init_cache(config, batch, slots) for k in fns}

    def side(name: str, index: jax.Array):
        def run():
            caches[name] = jax.block_until_ready(fns[name](params, caches[name], index))

        return run

    for n in filled:
        index = jnp.int32(n - 1)
        ms = cpu_ms({k: side(k, index) for k in fns}, warmup, repeats)
        a, b = ms["all"], ms["bucket"]
        table.add(slots, n, a, b, b / a)
    table.notes.append(
        "Both columns read the same weights; only the attended slots differ. Times are CPU "
        "time of this process (all threads), the fastest timed call."
    )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    tiny = args.size == "tiny"
    lengths = (64, 128) if tiny else (256, 512, 1024, 2048, 4096)
    heads, kv, e = (4, 2, 8) if tiny else (32, 8, 64)
    model = ModelConfig(
        model_type="llama", vocab_size=512 if tiny else 8192, d_model=64 if tiny else 512,
        n_layers=2 if tiny else 8, n_heads=4 if tiny else 8, n_kv_heads=2 if tiny else 4,
        head_dim=16 if tiny else 64, mlp_dim=128 if tiny else 1408,
        max_position_embeddings=8192,
    )  # fmt: skip
    slots, filled = (512, (64, 300)) if tiny else (4096, (64, 1024, 4096))
    tables = [
        attention_table(lengths, heads, kv, e, args.warmup, args.repeats),
        decode_table(model, 1 if tiny else 8, slots, filled, args.warmup, args.repeats),
    ]
    publish("attention", tables, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
