"""The accelerator check: one table of what rlhf_jax does on one GPU, in one run of a few
minutes, with nothing downloaded (random models built locally, the project run from the tree).

    bash bench/accelerator.sh [--size full|tiny] [--out DIR]

Rows (docs: BENCHMARKS.md, "Accelerator check"):
1. bf16 and fp32 logits and next-token log-probs against transformers, same tokens, same device;
2. generation tokens/s against transformers' `generate`, batch 8 and 64;
3. the SFT step's MFU in bf16 at ~1B against the board's bf16 dense peak;
4. one PPO and one GRPO iteration at ~0.5B (bench.rl_iteration's own runner);
5. peak device memory of the SFT step and of the PPO update against XLA's prediction;
6-10 (issue 23, `bench/accelerator_long.py`): the attention path the device takes against a
   float32 dense reference, and its time and temporaries at 1k / 8k / 32k tokens; a decode
   step's time by filled cache slots; `generate` with the layer scan against the unrolled
   layers; and `rlhf-jax plan` of the 8B LoRA config at 1k + 1k compiled for the device.

Every section runs in a child process: a crash, an out-of-memory kill or a hang costs only
its rows (each then says `failed: <reason>`), PyTorch's and JAX's allocators start empty for
each, and the peak-memory rows read a per-process peak that nothing earlier has raised. Each
section gets a share of the run's time budget (`Sizes.budget_s`, 760 s at full size); one
that runs past it is killed and its unfinished rows fail with the reason.

Estimated time at --size full: section "hf" measured 190 s on one H200 (2026-12-04: logits
66 + 24 s, `generate` 46 + 45 s, compiles included); "sft" ~60 s (~40 s compile, 5 steps of
~0.2 s); "rl" ~150 s (PPO and GRPO: ~60 s of compile each, 5 iterations of ~1 s each);
"attention" ~120 s (measured 100 s on the H200 in a second run; 60 s had run out in the
first), "decode" ~90 s (measured 78 s), "plan" ~150 s (three 8B stages compiled: measured
83 s). About 13 minutes in all, which is the budget: one device command may run 10 minutes,
so a lease runs a subset (on the H200, attention + plan took 183 s and decode 78 s).
--size tiny runs everything at toy shapes on the CPU in about a minute and a half.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.accelerator_common import ROWS, SIZES, Recorder, failed_cells, settings
from bench.common import REPO, Table

SECTIONS = ("hf", "sft", "rl", "attention", "decode", "plan")
# Shares of the time budget, in proportion to the estimates in the module docstring; time a
# section leaves unused goes to the ones after it.
SHARES = {"hf": 190, "sft": 60, "rl": 150, "attention": 120, "decode": 90, "plan": 150}
COLUMNS = ("check", "setting", "rlhf_jax", "reference", "ratio", "s")
VERSIONED = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(SECTIONS)}"
        )
    return tuple(dict.fromkeys(names))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--out", type=Path, default=None, help="folder for accelerator.md/.json")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints are written")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    p.add_argument(
        "--sections",
        type=_sections,
        default=SECTIONS,
        help=f"comma-separated sections to run, in this order (default: {','.join(SECTIONS)}); "
        "the others' rows read 'not run'",
    )
    # A child process runs one section and writes its rows to --result.
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- child


def run_section(section: str, size: str, workdir: Path, result: Path) -> None:
    """In the child: measure one section's rows, each guarded by the recorder."""
    from bench import accelerator_hf, accelerator_long, accelerator_train
    from bench.accelerator_common import device_facts
    from bench.trl_setup import quiet

    quiet()
    rec = Recorder(result)
    with contextlib.suppress(Exception):  # the header can do without; the rows cannot
        rec.set_device(device_facts())
    runners = {
        "hf": accelerator_hf.run,
        "sft": accelerator_train.run_sft,
        "rl": accelerator_train.run_rl,
        "attention": accelerator_long.run_attention,
        "decode": accelerator_long.run_decode,
        "plan": accelerator_long.run_plan,
    }
    runners[section](SIZES[size], workdir, rec)


# ----------------------------------------------------------------------------- parent


# --size tiny is a smoke run whose speeds mean nothing: XLA:CPU's LLVM optimisation is most of
# its compile time, and turning it off saves a third of the run (the logit differences it
# checks come out the same).
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def child_env(size: str) -> dict[str, str]:
    env = dict(os.environ)
    if size == "tiny":
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS"), TINY_XLA_FLAGS) if f)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # PyTorch and JAX share the GPU in section "hf": JAX must not take 75% of it up front.
    # The allocator's peak statistics are the same either way.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return ""


def spawn(section: str, args, workdir: Path, logs: Path, timeout: float) -> dict[str, Any]:
    """Run one section's child; returns {"rows", "device", "seconds", "error"}."""
    result, log = workdir / f"{section}.json", logs / f"accelerator_{section}.log"
    cmd = [sys.executable, "-m", "bench.accelerator", "--section", section, "--size", args.size]
    cmd += ["--workdir", str(workdir), "--result", str(result)]
    start, error = time.perf_counter(), None
    with open(log, "w") as out:
        try:
            code = subprocess.run(
                cmd, cwd=REPO, env=child_env(args.size), stdout=out, stderr=subprocess.STDOUT,
                timeout=max(timeout, 1.0), check=False,
            ).returncode  # fmt: skip
            if code:
                error = f"section '{section}' exited with {code}: {last_line(log)}"
        except subprocess.TimeoutExpired:
            error = f"section '{section}' timed out after {timeout:.0f} s (its time budget)"
    seconds = time.perf_counter() - start
    data: dict[str, Any] = {"rows": {}, "device": {}}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(result.read_text())
    print(f"[accelerator] section {section}: {seconds:.0f} s, log {log}", file=sys.stderr)
    if error:  # the log goes with the temporary folder when there is no --out: show its end
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        print("\n".join([f"[accelerator] {error}", *tail]), file=sys.stderr)
    return {**data, "seconds": seconds, "error": error}


def run_all(args) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """(rows by id, sections' seconds and errors, device facts) of every section in turn."""
    budget = args.budget or SIZES[args.size].budget_s
    workdir = Path(tempfile.mkdtemp(prefix="rlhf_jax_accelerator_", dir=args.workdir))
    logs = args.out or workdir
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    sections: dict[str, dict] = {}
    device: dict[str, str] = {}
    try:
        for i, name in enumerate(args.sections):
            left = budget - (time.perf_counter() - start)
            share = SHARES[name] / sum(SHARES[s] for s in args.sections[i:])
            got = spawn(name, args, workdir, logs, left * share)
            sections[name] = {"seconds": got["seconds"], "error": got["error"]}
            device = device or got.get("device") or {}
            for row in ROWS:
                if row.section != name:
                    continue
                rows[row.id] = got["rows"].get(row.id) or {
                    **failed_cells(got["error"] or "not measured"),
                    "seconds": None,
                }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # GBs of random checkpoints
    skipped = {"rlhf_jax": "not run (--sections)", "reference": "", "ratio": "", "seconds": None}
    return {r.id: rows.get(r.id, skipped) for r in ROWS}, sections, device


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    # jax's CUDA wheels are named by CUDA major version (jax-cuda12-plugin, jax-cuda13-...).
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("jax-cuda") and name.endswith("plugin"):
            out["jax cuda plugin"] = f"{name} {dist.version}"
    return out


def command(argv: list[str]) -> str:
    # The wrapper says it was the entry point, so the header names what the user typed.
    head = "bash bench/accelerator.sh" if os.environ.get("RLHF_JAX_ACCELERATOR_SH") else None
    return " ".join([head or "python -m bench.accelerator", *argv])


def header(device: dict[str, str], argv: list[str]) -> str:
    v = versions()
    jax_dev = (
        f"{device.get('jax_device_count', '?')} x {device.get('jax_device', 'unknown')} "
        f"({device.get('jax_platform', '?')})"
    )
    torch_dev = device.get("torch_device", "?")
    if "torch_device_name" in device:
        torch_dev += f" {device['torch_device_name']}, CUDA {device.get('torch_cuda', '?')}"
    plugin = f", {v['jax cuda plugin']}" if "jax cuda plugin" in v else ""
    return (
        f"**device:** {jax_dev} · **jax** {v.get('jax', '?')} (jaxlib {v.get('jaxlib', '?')}"
        f"{plugin}) · **torch** {v.get('torch', '?')} on {torch_dev} · **transformers** "
        f"{v.get('transformers', '?')} · flax {v.get('flax', '?')} · optax {v.get('optax', '?')}"
        f" · {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC · **command:** "
        f"`{command(argv)}`"
    )


def table(rows: dict[str, dict], size: str) -> Table:
    t = Table("Accelerator check", COLUMNS)
    described = settings(SIZES[size])
    for row in ROWS:
        cells = rows[row.id]
        secs = cells.get("seconds")
        t.add(
            row.check,
            described[row.id],
            cells["rlhf_jax"],
            cells.get("reference") or "—",
            cells.get("ratio") or "—",
            "—" if secs is None else f"{secs:.1f}",
        )
    return t


def render(rows, sections, device, argv, size: str, total: float) -> str:
    timing = ", ".join(f"{name} {s['seconds']:.0f} s" for name, s in sections.items())
    return "\n".join(
        [
            header(device, argv),
            "",
            table(rows, size).markdown(),
            "",
            f"Sections (each its own process): {timing}; total {total:.0f} s. "
            "s = the row's own seconds, the first row of a section including its setup "
            "(checkpoint, loading, compiling).",
        ]
    )


def write(out: Path, text: str, rows, sections, device, argv, size: str, total: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.md").write_text(text + "\n")
    data = {
        "command": command(argv),
        "size": size,
        "device": device,
        "versions": versions(),
        "sections": sections,
        "total_seconds": total,
        "rows": [{"id": r.id, "check": r.check, **rows[r.id]} for r in ROWS],
    }
    (out / "accelerator.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.section:
        run_section(args.section, args.size, args.workdir, args.result)
        return 0
    # Children run in the repository root: every path they get is absolute.
    args.out = args.out.resolve() if args.out else None
    args.workdir = args.workdir.resolve() if args.workdir else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, sections, device = run_all(args)
    total = time.perf_counter() - start
    text = render(rows, sections, device, argv, args.size, total)
    print(text, flush=True)
    if args.out:
        write(args.out, text, rows, sections, device, argv, args.size, total)
    failed = [r.id for r in ROWS if rows[r.id]["rlhf_jax"].startswith("failed:")]
    if failed:
        print(f"[accelerator] failed rows: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    print("[accelerator] interrupted", file=sys.stderr)
    sys.exit(130)
