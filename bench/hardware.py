"""The machine's limits: fp32 matmul FLOP/s of JAX and PyTorch, and memory copy bandwidth.

Every utilisation figure in BENCHMARKS.md divides by these numbers: model FLOP/s by the matmul
peak (`bench.flops.matmul_peak`, the best of JAX and PyTorch on a 2048^3 fp32 matmul), decode
step times by the copy bandwidth (`bench.flops.copy_bandwidth`).

    python -m bench.hardware [--size tiny|full] [--out PATH|-]
"""

from __future__ import annotations

from bench.common import Table, parser, publish, set_torch_threads
from bench.flops import copy_bandwidth, jax_matmul_flops, torch_matmul_flops

PEAK_SIZE = 2048  # the size `bench.flops.matmul_peak` uses by default

COLUMNS = ("matmul n", "JAX GFLOP/s", "PyTorch GFLOP/s", "best GFLOP/s")
LIMIT_COLUMNS = ("limit", "value", "how")


def run(sizes: tuple[int, ...], peak_size: int, copy_bytes: int, repeats: int) -> list[Table]:
    threads = set_torch_threads()
    matmul = Table("Matmul throughput (fp32, n x n x n)", COLUMNS)
    matmul.notes.append(
        f"2 n^3 FLOPs / best time of {repeats} calls after one untimed call; JAX: a jitted "
        f"`x @ y`, PyTorch: `torch.mm` on {threads} threads."
    )
    best: dict[int, float] = {}
    for n in sizes:
        j = jax_matmul_flops(n, repeats)
        t = torch_matmul_flops(n, repeats)
        best[n] = max(j, t or 0.0)
        matmul.add(n, j / 1e9, float("nan") if t is None else t / 1e9, best[n] / 1e9)
    bandwidth = copy_bandwidth(copy_bytes, repeats)
    limits = Table("Limits the other tables divide by", LIMIT_COLUMNS)
    limits.add(
        "matmul peak",
        f"{best[peak_size] / 1e9:.1f} GFLOP/s",
        f"best of JAX and PyTorch at n = {peak_size} (`bench.flops.matmul_peak`)",
    )
    limits.add(
        "copy bandwidth",
        f"{bandwidth / 1e9:.1f} GB/s",
        f"read + write of a {copy_bytes // 2**20} MiB fp32 buffer, best of NumPy and JAX "
        "(`bench.flops.copy_bandwidth`)",
    )
    return [matmul, limits]


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.size == "tiny":
        tables = run((128, 256), 256, 16 * 2**20, min(args.repeats, 2))
    else:
        tables = run((1024, PEAK_SIZE, 4096), PEAK_SIZE, 512 * 2**20, max(args.repeats, 1))
    return publish("hardware", tables, args.out)


if __name__ == "__main__":
    main()
