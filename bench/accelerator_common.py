"""What the accelerator check's sections share: sizes, the rows, guarded recording of each
row, device facts, the bf16 peak by device name, random checkpoints and the memory prediction.

Each section runs in a child process of `bench.accelerator` (see there why); this module is
imported by both the parent and the children, so it imports jax and torch only inside
functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.models import TINY_LLAMA, Shape, hf_config
from bench.rl_iteration import Sizes as RLSizes

GIB = 2**30

# ~1B: Llama-3.2-1B's trunk (16 layers, 2048 wide, 32 heads over 8 KV heads, MLP 8192) with a
# 32k vocabulary (Llama 2's) and untied embeddings: 1.10B parameters.
BIG = Shape("llama 16L/2048d gqa, 1.1B", "llama", 16, 2048, 32, 8, 8192, 32000, 2048)
# ~0.5B: 12 layers (not 24 narrower ones) because generation unrolls the layers in its decode
# loop, and compile time, not run time, dominates an RL iteration's first call: 0.51B.
SMALL = Shape("llama 12L/1536d gqa, 0.51B", "llama", 12, 1536, 12, 4, 6144, 32000, 1024)

GEN_BATCHES = (8, 64)


@dataclasses.dataclass(frozen=True)
class LongSizes:
    """Rows 6-10 (bench/accelerator_long.py): attention at real lengths, decode, the plan."""

    tiny: bool
    heads: int  # attention rows: query heads, kv heads, head dims checked
    kv_heads: int
    head_dims: tuple[int, ...]
    check_batch: int  # row 6: rows x tokens of each padding layout
    check_len: int  # odd: cuDNN's rows are padded (attention_cudnn.ALIGN)
    lengths: tuple[int, ...]  # row 7: one row per length (batch 1, the largest head dim)
    dense_max: int  # the dense path only up to here (its f32 scores are quadratic)
    dtype: str  # rows 8-9: the `big` shape's trunk in this dtype
    decode_batch: int
    slots: int  # row 8: the cache allocation, and the filled counts timed in it
    filled: tuple[int, ...]
    scan_layers: int  # row 9: layers of the `big` shape, prompt length, (short, long) N
    scan_prompt: int
    scan_new: tuple[int, int]


LONG_FULL = LongSizes(
    False, 32, 8, (64, 128), 4, 1001, (1024, 8192, 32768), 8192, "bfloat16",
    8, 4096, (64, 1024, 4096), 4, 16, (8, 40),
)  # fmt: skip
LONG_TINY = LongSizes(
    True, 4, 2, (16,), 4, 61, (64, 128, 256), 128, "bfloat16", 2, 512, (64, 300, 512), 2, 8, (2, 6)
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    big: Shape  # rows 1-3 and the SFT memory row
    small: Shape  # row 4 and the PPO memory row
    logits_batch: int
    logits_len: int
    gen_prompt: int
    gen_new: int
    sft_batch: int
    sft_len: int
    rl: RLSizes  # prompts x completions of one RL iteration (bench.rl_iteration's own sizes)
    warmup: int  # discarded calls after the first (compiling) one
    repeats: int  # timed calls (median)
    budget_s: float  # the whole run's wall-clock limit, shared out between the sections
    long: LongSizes


SIZES = {
    "full": Sizes(
        BIG, SMALL, 4, 256, 64, 128, 16, 512, RLSizes(SMALL, 8, 4, 64, 128), 1, 3, 760.0, LONG_FULL
    ),
    "tiny": Sizes(
        TINY_LLAMA,
        TINY_LLAMA,
        2,
        16,
        8,
        8,
        2,
        16,
        RLSizes(TINY_LLAMA, 2, 2, 8, 8),
        0,
        1,
        210.0,
        LONG_TINY,
    ),  # fmt: skip
}


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    section: str  # the child process that measures it
    check: str  # the first cell


ROWS = (
    Row("logits_fp32", "hf", "1. logits fp32 vs transformers"),
    Row("logits_bf16", "hf", "1. logits bf16 vs transformers"),
    *(Row(f"generate_b{b}", "hf", f"2. generate tok/s, batch {b}") for b in GEN_BATCHES),
    Row("sft_mfu", "sft", "3. SFT step MFU, bf16"),
    Row("ppo_iteration", "rl", "4. PPO iteration"),
    Row("grpo_iteration", "rl", "4. GRPO iteration"),
    Row("memory_sft", "sft", "5. peak memory, SFT step"),
    Row("memory_ppo", "rl", "5. peak memory, PPO update"),
    Row("attention_equal", "attention", "6. attention vs dense fp32 reference"),
    *(
        Row(f"attention_{i}", "attention", f"7. attention fwd+bwd, length {i + 1}")
        for i in range(3)
    ),
    Row("decode_filled", "decode", "8. decode step by filled slots"),
    Row("decode_layer_scan", "decode", "9. generate per step, layer scan"),
    Row("plan_8b", "plan", "10. plan compiled for this device"),
)


def settings(s: Sizes) -> dict[str, str]:
    """The second cell of every row: what was run, at which shape."""
    r = s.rl
    rl = (
        f"{s.small.name}, fp32, {r.prompts} prompts x {r.completions} samples, "
        f"{r.prompt_len} + {r.new_tokens} tokens, 1 update"
    )
    sft = f"{s.big.name}, {s.sft_batch} x {s.sft_len} tokens, bf16 compute, fp32 AdamW"
    out = {
        "logits_fp32": f"{s.big.name}, {s.logits_batch} x {s.logits_len} tokens",
        "logits_bf16": f"{s.big.name}, {s.logits_batch} x {s.logits_len} tokens",
        "sft_mfu": sft,
        "ppo_iteration": rl + ", 4 models (critic)",
        "grpo_iteration": rl + ", 3 models, KL in loss",
        "memory_sft": sft,
        "memory_ppo": rl + ", the update after one experience",
    }
    for b in GEN_BATCHES:
        out[f"generate_b{b}"] = (
            f"{s.big.name}, bf16, greedy, prompt {s.gen_prompt} + {s.gen_new} new, KV cache"
        )
    return out | long_settings(s)


def long_settings(s: Sizes) -> dict[str, str]:
    g = s.long
    heads = f"{g.heads} heads / {g.kv_heads} kv"
    out = {
        "attention_equal": f"{g.check_batch} x {g.check_len} tokens, {heads}, head dim "
        f"{' and '.join(map(str, g.head_dims))}, bf16; left/trailing padding, a hole, packed",
        "decode_filled": f"{s.big.name} trunk, {g.dtype}, batch {g.decode_batch}, one step "
        f"in a {g.slots:,}-slot cache; ratio: target <= 1.5x",
        "decode_layer_scan": f"{g.scan_layers} of {s.big.name}'s layers, {g.dtype}, batch "
        f"{g.decode_batch}, {g.scan_prompt}-token prompts, N = {g.scan_new[1]} less "
        f"N = {g.scan_new[0]}",
        "plan_8b": "quickstart SFT stage (harness check)"
        if g.tiny
        else "llama-3.1-8b-lora-1gpu.yaml, 1,024 + 1,024 tokens, 80GB",
    }
    for i, t in enumerate(g.lengths):
        out[f"attention_{i}"] = f"T = {t:,}, batch 1, {heads}, head dim {max(g.head_dims)}, bf16"
    return out


# ----------------------------------------------------------------------------- guarding


class SetupFailed(RuntimeError):
    """A shared setup failed; its message already names the setup and the original error."""


def one_line(error: BaseException | str, limit: int = 160) -> str:
    """A reason that fits a table cell: first line, no pipes, bounded length."""
    if isinstance(error, str | SetupFailed):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "unknown error")
    line = line.replace("|", "/")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failed_cells(reason: str) -> dict[str, Any]:
    return {"rlhf_jax": f"failed: {one_line(reason)}", "reference": "", "ratio": "", "values": {}}


class Lazy:
    """A value built on first use and shared by the rows that need it. A failure is kept
    too, so every row that needs the value fails with the same reason and no row retries a
    minutes-long setup."""

    def __init__(self, build: Callable[[], Any], what: str):
        self.build, self.what = build, what
        self.done, self.value, self.error = False, None, None

    def get(self) -> Any:
        if not self.done:
            self.done = True
            try:
                self.value = self.build()
            except Exception as e:  # noqa: BLE001 - reported in the table, not raised
                self.error = f"{self.what}: {one_line(e)}"
        if self.error is not None:
            raise SetupFailed(self.error)
        return self.value


class Recorder:
    """Runs each row of a section under a guard and rewrites the section's result file after
    every row, so rows finished before a crash or a timeout of the process still count."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.result: dict[str, Any] = {"device": {}, "rows": {}}

    def set_device(self, facts: dict[str, str]) -> None:
        self.result["device"] = facts
        self._write()

    def run(self, row_id: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            cells = fn()
        except Exception as e:  # noqa: BLE001 - a failed row is a cell, the run goes on
            cells = failed_cells(one_line(e))
        cells["seconds"] = time.perf_counter() - start
        self.result["rows"][row_id] = cells
        print(f"[accelerator] {row_id}: {cells['rlhf_jax']} ({cells['seconds']:.1f} s)", flush=True)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- device


def device_facts() -> dict[str, str]:
    """What the header line names: the JAX device and where PyTorch runs."""
    import jax
    import torch

    d = jax.devices()[0]
    facts = {
        "jax_platform": d.platform,
        "jax_device": getattr(d, "device_kind", d.platform),
        "jax_device_count": str(jax.device_count()),
        "torch_device": torch_device(),
    }
    if torch.cuda.is_available():
        facts["torch_device_name"] = torch.cuda.get_device_name(0)
        facts["torch_cuda"] = str(torch.version.cuda)
    return facts


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def on_cpu() -> bool:
    import jax

    return jax.devices()[0].platform == "cpu"


# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets; first match wins, so
# the PCIe and NVL boards come before the plain "H100" of the SXM board ("NVIDIA H100 80GB
# HBM3"). H200 and GH200 have the H100 SXM's tensor cores.
BF16_PEAKS = (
    ("h100 pcie", 756e12, "H100 PCIe"),
    ("h100 nvl", 835e12, "H100 NVL"),
    ("h100", 989e12, "H100 SXM"),
    ("h200", 989e12, "H200 (= H100 SXM)"),
    ("a100", 312e12, "A100"),
)


def bf16_peak(device_name: str) -> tuple[float, str] | None:
    """(FLOP/s, which board was assumed) for a device name, or None when unknown."""
    name = device_name.lower()
    for needle, flops, label in BF16_PEAKS:
        if needle in name:
            return flops, label
    return None


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_folder(shape: Shape, workdir: Path) -> Path:
    return Path(workdir) / re.sub(r"[^A-Za-z0-9]+", "_", shape.name).strip("_")


def ensure_checkpoint(shape: Shape, workdir: Path, keep_model: bool = False):
    """The random-weight HF folder of `shape` under `workdir`, built once per run and shared
    by the sections. Built on the GPU when PyTorch has one (initialising 1B parameters on
    the CPU takes longer than everything else in a section). Returns (folder, the PyTorch
    model in fp32 if `keep_model` and it was built here, else None)."""
    import torch
    import transformers

    folder = checkpoint_folder(shape, workdir)
    done = folder / ".complete"
    if done.exists():
        return folder, None
    torch.manual_seed(0)
    with torch.device(torch_device()):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(shape))
    model.save_pretrained(folder, safe_serialization=True)
    done.touch()
    if keep_model:
        return folder, model.eval()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the JAX side of the section needs the memory
    return folder, None


# ----------------------------------------------------------------------------- memory


def measured_peak_bytes() -> int | None:
    """The allocator's peak of this process on the first JAX device (None on CPU, where
    XLA keeps no statistics). There is no reset, which is why each section that reports a
    peak is its own process and measures it first."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def predicted_peak_bytes(programs: Sequence[tuple[Any, int]]) -> int:
    """Predicted peak of a process that runs each of `programs` (`CompiledOnce`, compiled):
    the largest, over the programs, of XLA's account of the program (arguments + outputs +
    temporaries - donated, `CompiledOnce.peak_bytes`) plus the bytes that stay on the device
    during it without being its arguments (e.g. RL's frozen models during the update), or
    minus those XLA counted twice (one buffer passed as two arguments).

    The one place to switch to `rlhf-jax plan`'s prediction once it exists."""
    return max(compiled.peak_bytes() + resident for compiled, resident in programs)


def unique_bytes(tree) -> int:
    """Device bytes of a pytree's arrays, each buffer counted once (the reference and the
    reward trunk are the same arrays in bench.rl_iteration)."""
    import jax

    return sum({id(x): x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")}.values())


def repeated_bytes(tree) -> int:
    """Bytes XLA counts more than once when `tree` is passed as arguments: a buffer passed
    twice is two parameters to the compiled program, one buffer on the device."""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))
    return total - unique_bytes(tree)


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def memory_cells(measured: int | None, predicted: int) -> dict[str, Any]:
    values = {"measured_bytes": measured, "predicted_bytes": predicted}
    pred = f"predicted {size(predicted)} (XLA memory analysis)"
    if measured is None:
        return {
            "rlhf_jax": "n/a on cpu (no allocator statistics)",
            "reference": pred,
            "ratio": "n/a on cpu",
            "values": values,
        }
    return {
        "rlhf_jax": f"measured {size(measured)}",
        "reference": pred,
        "ratio": f"{measured / predicted:.2f}x" if predicted else "n/a",
        "values": values,
    }
