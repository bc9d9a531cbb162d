"""Model FLOPs and the machine's measured limits (matmul peak, copy bandwidth).

Model FLOPs follow the usual accounting (Kaplan et al. 2020; PaLM appendix B): a forward pass
costs 2 FLOPs per multiply-accumulate of every weight matmul, plus the attention score and
value products (2 * 2 * T * d per token per layer, causal mask not discounted) and the LM head;
a training step costs 3x the forward (backward = 2x). Utilisation = model FLOPs / time / peak,
with the peak *measured* here as the best of JAX and PyTorch on a large fp32 matmul, so the
percentage says how close a step is to what this machine can actually do.
"""

from __future__ import annotations

import time

import numpy as np

from bench.models import Shape


def forward_flops_per_token(shape: Shape, seq_len: int, lm_head: bool = True) -> float:
    """FLOPs to run one token through the model in a full-sequence forward of length seq_len."""
    d = shape.d_model
    weight_macs = shape.n_params(with_embeddings=False)  # each trunk weight: one MAC per token
    attention_macs = shape.n_layers * 2 * seq_len * d  # QK^T and AV over the whole context
    head_macs = shape.vocab * d if lm_head else d  # LM head, or a scalar head
    return 2.0 * (weight_macs + attention_macs + head_macs)


def train_flops(shape: Shape, batch: int, seq_len: int, lm_head: bool = True) -> float:
    """FLOPs of one forward + backward over a [batch, seq_len] batch."""
    return 3.0 * batch * seq_len * forward_flops_per_token(shape, seq_len, lm_head)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n x n fp32 matmul in JAX (best of `repeats`)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    return 2.0 * n**3 / _best_time(lambda: mm(a, b).block_until_ready(), repeats)


def torch_matmul_flops(n: int = 2048, repeats: int = 5) -> float | None:
    """The same with PyTorch, or None when torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    return 2.0 * n**3 / _best_time(lambda: torch.mm(a, b), repeats)


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """{"jax": ..., "torch": ..., "peak": best of both} in FLOP/s."""
    out = {"jax": jax_matmul_flops(n, repeats)}
    t = torch_matmul_flops(n, repeats)
    if t is not None:
        out["torch"] = t
    out["peak"] = max(out.values())
    return out


def copy_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: read + write of a buffer much larger than cache,
    counted as 2 * n_bytes per copy (the best of NumPy and JAX)."""
    import jax
    import jax.numpy as jnp

    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    numpy_bw = 2 * n_bytes / _best_time(lambda: np.copyto(dst, src), repeats)
    x = jnp.ones(n_bytes // 4, jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)  # one read + one write per element
    jax_bw = 2 * n_bytes / _best_time(lambda: copy(x).block_until_ready(), repeats)
    return max(numpy_bw, jax_bw)


def decode_bytes_per_step(shape: Shape, batch: int, context: int, bytes_per_value: int = 4) -> int:
    """Bytes one decode step must read at least: every weight once (shared by the batch) plus
    each row's KV cache up to `context` tokens."""
    d = shape.d_model
    kv_width = (shape.n_kv_heads or shape.n_heads) * (d // shape.n_heads)
    weights = shape.n_params(with_embeddings=True)
    if shape.family == "gpt2":
        weights -= shape.max_positions * d  # position table: one row read per token
    cache = batch * context * shape.n_layers * 2 * kv_width
    return (weights + cache) * bytes_per_value
