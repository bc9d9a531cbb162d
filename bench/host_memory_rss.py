"""Peak resident size, page faults and time of an SFT step under three host-malloc settings.

`python -m bench.host_memory_rss [--shape 12l|6l|qwen0.5b|tiny] [--steps 4] [--batch 8] [--seq 256]`

Each setting runs in a fresh process that loads a random-weight Hugging Face checkpoint with
`load_hf` (as `rlhf-jax sft` does: the loading's transient copies are part of the story), builds
the jitted SFT step with AdamW (donated state) and runs one warm-up step and `--steps` timed
ones on random token ids:
- system: malloc's defaults (RLHF_JAX_SYSTEM_MALLOC=1);
- old: the setting rlhf_jax used before the bound (one arena, no mmap, no trim, for the whole
  process), applied here with mallopt directly;
- kept: `keep_freed_host_memory()` as the `rlhf-jax` command applies it now.
The table gives each process's peak resident size (getrusage's ru_maxrss), the minor page
faults and the wall time per timed step, and whether the bound gave freed memory back. A
process the kernel kills (out of memory) is reported with its signal. Nothing is written to
BENCHMARKS.md. At `--shape qwen0.5b` (494M parameters, vocabulary 151,936) a process needs
~17 GB; run it on an otherwise idle machine with 24 GiB or more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ("system", "old", "kept")
SHAPES = ("12l", "6l", "qwen0.5b", "tiny")


def _hf_config(shape: str):
    import transformers

    if shape == "qwen0.5b":  # Qwen2.5-0.5B's shape: 24 layers, 896 wide, GQA 14/2, tied head
        return transformers.Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    from bench.models import GPT2_6L, GPT2_12L, TINY, hf_config

    return hf_config({"12l": GPT2_12L, "6l": GPT2_6L, "tiny": TINY}[shape])


def build(shape: str, folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(shape))
    model.save_pretrained(folder, safe_serialization=True)


def _apply(setting: str) -> None:
    """Set malloc up for `setting` before JAX starts."""
    if setting == "old":
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        # M_ARENA_MAX 1, M_MMAP_MAX 0, M_TRIM_THRESHOLD INT_MAX
        if not (libc.mallopt(-8, 1) and libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1)):
            raise RuntimeError("mallopt refused the old setting")
    elif setting == "kept":
        from rlhf_jax.host_memory import keep_freed_host_memory

        if not keep_freed_host_memory():
            raise RuntimeError("keep_freed_host_memory() did not apply (not Linux/CPU?)")


def child(setting: str, folder: Path, steps: int, batch: int, seq: int) -> dict:
    import resource
    import time

    _apply(setting)
    import jax
    import numpy as np

    from bench.training import jax_sft_step
    from rlhf_jax import host_memory
    from rlhf_jax.models import load_hf

    cfg, params = load_hf(folder)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, seq))
    step, state, batch_ = jax_sft_step(cfg, params, ids)
    del params
    key = jax.random.key(0)
    state, _ = jax.block_until_ready(step(state, batch_, key))  # compile + warm-up step
    times, faults = [], []
    for _ in range(steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, batch_, key))
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.device_get(metrics).values())
    return {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "faults": sorted(faults)[len(faults) // 2],
        "seconds": sorted(times)[len(times) // 2],
        "released": host_memory.released(),
    }


def run_setting(setting: str, args, folder: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("RLHF_JAX_MALLOC_KEEP_BELOW", None)
    if args.keep_below is not None:
        env["RLHF_JAX_MALLOC_KEEP_BELOW"] = args.keep_below
    if setting != "kept":  # bench.common applies the kept setting at import otherwise
        env["RLHF_JAX_SYSTEM_MALLOC"] = "1"
    else:
        env.pop("RLHF_JAX_SYSTEM_MALLOC", None)
    cmd = [sys.executable, "-m", "bench.host_memory_rss", "--child", setting]
    cmd += ["--folder", str(folder), "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode}"}
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(shape: str, args, results: dict[str, dict]) -> str:
    lines = [
        f"SFT step, {shape}, batch {args.batch} x {args.seq}, median of {args.steps} steps",
        "| setting | peak RSS (GB) | page faults / step | s / step | freed memory given back |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        back = r["released"] or ("no" if name == "kept" else "")
        gb, faults, seconds = r["peak_rss"] / 1e9, r["faults"], r["seconds"]
        cells = (name, f"{gb:.2f}", f"{faults:,}", f"{seconds:.2f}", back)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="12l")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--settings", nargs="*", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--keep-below", default=None, help="RLHF_JAX_MALLOC_KEEP_BELOW for 'kept'")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:
        build(args.shape, args.folder)
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps, args.batch, args.seq)))
        return 0
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_rss_") as tmp:
        folder = Path(tmp)
        # In a process of its own: the parent holds no model while the settings are measured.
        subprocess.run(
            [sys.executable, "-m", "bench.host_memory_rss", "--build", "--shape", args.shape]
            + ["--folder", str(folder)],
            check=True,
        )
        results = {}
        for setting in args.settings:
            results[setting] = run_setting(setting, args, folder)
            print(f"{setting}: {results[setting]}", file=sys.stderr, flush=True)
    print(table(args.shape, args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
