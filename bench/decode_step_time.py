"""Decode step time of the unrolled sampler against the layer scan
(`generate(layer_scan=True)`) on this machine: a Llama-style 6L/512d model (vocab 8192,
float32), batch 8, 16-token prompts, no EOS; per step = (time at N = 72 - time at N = 8) / 64,
so the prefill and the call's fixed costs cancel; best of 3 after a warm-up call.

    python -m bench.decode_step_time
"""

from __future__ import annotations

import time


def _best(fn, repeats: int = 3) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.config import FAMILY_SWITCHES, ModelConfig
    from rlhf_jax.models.transformer import init_params
    from rlhf_jax.rollout import generate

    cfg = ModelConfig(
        model_type="llama", vocab_size=8192, d_model=512, n_layers=6, n_heads=8,
        n_kv_heads=8, head_dim=64, mlp_dim=2048, max_position_embeddings=1024,
        **FAMILY_SWITCHES["llama"],
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.ones((8, 16), jnp.int32)
    for scan in (False, True):
        t = {}
        for n in (8, 72):

            def run(n=n, scan=scan):
                out = generate(cfg, params, ids, ids, jax.random.key(1), n, layer_scan=scan)
                out.tokens.block_until_ready()

            t[n] = _best(run)
        step = (t[72] - t[8]) / 64
        print(f"layer_scan={scan}: {step * 1e3:.1f} ms per decode step", flush=True)


if __name__ == "__main__":
    main()
