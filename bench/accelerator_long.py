"""Rows 6-10 of the accelerator check (issue 23): the attention paths at real lengths, the
decode step's cost, and the 8B plan compiled for the device itself.

- "attention" (rows 6-7): each path the backend would take (cuDNN on a GPU, blocked
  elsewhere) against a float32 dense reference, forward and gradients, on rows with left
  padding, trailing padding, a hole and packed segments; then forward + backward time and
  compiled temporaries at growing lengths against the blocked and dense paths.
- "decode" (rows 8-9): one decode step with 64 / 1,024 / all filled slots of one cache
  allocation, reading the bucket that holds them against reading every slot; and
  `generate`'s time per decode step and compiled temporaries with the layer scan against
  the unrolled layers (whether the device feeds the matmuls from the stacked weights in
  place, which decides what `ppo.decode_layer_scan` costs).
- "plan" (row 10): `rlhf-jax plan --json` of `configs/llama-3.1-8b-lora-1gpu.yaml` at 1k + 1k,
  compiled by this device's compiler (no XLA:CPU correction applies), against the figures the
  plan gives on XLA:CPU with its correction (docs/memory.md).

Each section is its own process (bench/accelerator.py); jax is imported inside functions.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from bench.accelerator_common import GIB, Recorder, Sizes, on_cpu, one_line, size
from bench.common import REPO, time_one

# The CPU plan's corrected peaks of the 8B config at 1k + 1k (docs/memory.md, "Fitting 80 GB",
# 2026-12-03/04): what row 10 compares the device's own compile against.
CPU_CORRECTED_GIB = {"sft": 20.2, "rm": 18.4, "ppo": 47.6}
PLAN_8B = (
    "--config", "configs/llama-3.1-8b-lora-1gpu.yaml",
    "model.path=configs/shapes/llama-3.1-8b",
    "ppo.max_prompt_len=1024", "ppo.max_new_tokens=1024",
    "--device-memory", "80GB",
)  # fmt: skip
# --size tiny plans the quickstart's SFT stage only: the harness, not the numbers.
PLAN_TINY = ("--config", "configs/quickstart.yaml", "rm.steps=0", "ppo.iterations=0")


def _wall_ms(fn, warmup: int, repeats: int) -> float:
    """Median wall milliseconds of `fn` (which blocks until the device is done)."""
    return time_one(fn, warmup, repeats).median * 1e3


def _temporaries(compiled) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


# ----------------------------------------------------------------------------- attention


def _path_under_test() -> str:
    """What `attention="auto"` takes at long lengths here (cuDNN on GPU, blocked on CPU)."""
    return "blocked" if on_cpu() else "cudnn"


def _masks(kind: str, b: int, t: int):
    """(KeyMask, [B, T] 1 where a query is a real token) of one padding layout (any other
    `kind`: no padding)."""
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.models.attention import KeyMask

    valid = np.ones((b, t), np.int32)
    seg = None
    if kind == "spans":  # left padding, and a left-padded prompt + a response that stopped
        valid[1, : t // 8] = 0
        valid[2, : t // 16] = 0
        valid[2, t - t // 4 :] = 0
        valid[3, : t // 2] = 0
    elif kind == "hole":  # a row whose real tokens are two spans: cuDNN's batch falls back
        valid[1, t // 4 : t // 2] = 0
    elif kind == "packed":  # three sequences in a row, padding at its end
        seg = np.zeros((b, t), np.int32)
        seg[:, : t // 4] = 1
        seg[:, t // 4 : t // 2] = 2
        seg[:, t // 2 : t - t // 8] = 3
        valid = (seg > 0).astype(np.int32)
    mask = KeyMask(jnp.asarray(valid), 0, None if seg is None else jnp.asarray(seg))
    return mask, jnp.asarray(valid)


def _fwd_and_grads(kind: str, mask):
    """A jitted (q, k, v, cotangent) -> (out, dq, dk, dv) through `self_attention(kind)`.
    Callers zero the cotangent at padding queries, whose outputs no path defines alike."""
    import jax

    from rlhf_jax.models.attention import self_attention

    def loss(q, k, v, cot):
        out = self_attention(q, k, v, mask, kind=kind)
        return (out.astype(cot.dtype) * cot).sum(), out

    def run(q, k, v, cot):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, cot)
        return (out, *grads)

    return jax.jit(run)


def _rel_err(x, ref, q_valid=None) -> float:
    import jax.numpy as jnp

    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    if q_valid is not None:  # outputs: real queries only
        keep = q_valid[:, :, None, None] > 0
        x, ref = jnp.where(keep, x, 0), jnp.where(keep, ref, 0)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def attention_errors(sizes: Sizes) -> dict[str, Any]:
    """Relative max errors (forward on real queries, then the worst of dq, dk, dv) of the
    path under test and of the dense path, both in bf16, against dense in float32, per
    layout and head dim."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.attention import resolve

    s = sizes.long
    path = _path_under_test()
    cases, worst, worst_dense, uses_cudnn = {}, 0.0, 0.0, None
    # Every head dim on the rows cuDNN runs; the fallbacks (blocked) at the largest only.
    layouts = [("spans", d) for d in s.head_dims]
    layouts += [(name, max(s.head_dims)) for name in ("hole", "packed")]
    for layout, dim in layouts:
        b, t = s.check_batch, s.check_len
        mask, q_valid = _masks(layout, b, t)
        keys = jax.random.split(jax.random.key(dim), 4)
        q = jax.random.normal(keys[0], (b, t, s.heads, dim), jnp.float32)
        k = jax.random.normal(keys[1], (b, t, s.kv_heads, dim), jnp.float32)
        v = jax.random.normal(keys[2], (b, t, s.kv_heads, dim), jnp.float32)
        cot = jax.random.normal(keys[3], q.shape, jnp.float32) * q_valid[:, :, None, None]
        with jax.default_matmul_precision("highest"):
            ref = _fwd_and_grads("dense", mask)(q, k, v, cot)
        bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        errs = {}
        for name in dict.fromkeys((path, "dense")):
            fn = _fwd_and_grads(name, mask)
            got = fn(*bf, cot)
            fwd = _rel_err(got[0], ref[0], q_valid)
            grad = max(_rel_err(g, r) for g, r in zip(got[1:], ref[1:], strict=True))
            errs[name] = {"forward": fwd, "grads": grad}
            if name == "cudnn" and uses_cudnn is None:
                text = fn.lower(*bf, cot).compile().as_text()
                uses_cudnn = "cudnn" in text.lower()
        cases[f"{layout}, head dim {dim}"] = errs
        worst = max(worst, *errs[path].values())
        worst_dense = max(worst_dense, *errs["dense"].values())
    auto = resolve("auto", jnp.bfloat16, max(s.head_dims), 1 << 20, False)
    return {
        "rlhf_jax": f"{path}: worst rel. error {worst:.2e} (forward and dq/dk/dv, "
        f"{len(cases)} cases)",
        "reference": f"dense bf16: worst {worst_dense:.2e}; auto at long T -> {auto}"
        + ("" if uses_cudnn is None else f"; cuDNN kernel in the HLO: {uses_cudnn}"),
        "ratio": f"{worst / worst_dense:.2f}x" if worst_dense else "n/a",
        "values": {"path": path, "auto": auto, "cudnn_in_hlo": uses_cudnn, "cases": cases},
    }


def attention_speed(sizes: Sizes, t: int) -> dict[str, Any]:
    """Forward + backward of one causal attention at length t, batch 1, bf16: median wall
    ms and compiled temporaries of the path under test, blocked and dense."""
    import jax
    import jax.numpy as jnp

    s = sizes.long
    dim = max(s.head_dims)
    mask, _ = _masks("full", 1, t)  # no padding
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (1, t, s.heads, dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, s.kv_heads, dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, s.kv_heads, dim), jnp.bfloat16)
    cot = jnp.ones(q.shape, jnp.float32)
    path = _path_under_test()
    paths = list(dict.fromkeys((path, "blocked", *(("dense",) if t <= s.dense_max else ()))))
    got: dict[str, dict[str, Any]] = {}
    for name in paths:  # one path failing (out of memory, say) leaves the others' cells
        try:
            compiled = _fwd_and_grads(name, mask).lower(q, k, v, cot).compile()
            ms = _wall_ms(
                lambda c=compiled: jax.block_until_ready(c(q, k, v, cot)),
                sizes.warmup,
                sizes.repeats,
            )
            got[name] = {"ms": ms, "temporaries": _temporaries(compiled)}
        except Exception as e:  # noqa: BLE001 - reported in the cell
            got[name] = {"error": one_line(e, 100)}

    def cell(name: str) -> str:
        g = got[name]
        if "error" in g:
            return f"{name} failed: {g['error']}"
        return f"{name} {g['ms']:.2f} ms, {size(int(g['temporaries']))}"

    others = [cell(n) for n in paths[1:]] + (
        [] if "dense" in got else [f"dense not run above T = {s.dense_max:,}"]
    )
    timed = "ms" in got[path] and "ms" in got["blocked"]
    ratio = f"{got[path]['ms'] / got['blocked']['ms']:.2f}x blocked" if timed else "n/a"
    if "error" in got[path]:
        raise RuntimeError(f"{cell(path)}; {'; '.join(others)}")
    return {
        "rlhf_jax": cell(path),
        "reference": "; ".join(others),
        "ratio": ratio if path != "blocked" else "1.00x",
        "values": got,
    }


def run_attention(sizes: Sizes, workdir: Path, rec: Recorder) -> None:
    rec.run("attention_equal", lambda: attention_errors(sizes))
    for i, t in enumerate(sizes.long.lengths):
        rec.run(f"attention_{i}", lambda t=t: attention_speed(sizes, t))


# ----------------------------------------------------------------------------- decode


def decode_config(sizes: Sizes, layers: int | None = None):
    from rlhf_jax.models.config import FAMILY_SWITCHES, ModelConfig

    sh, s = sizes.big, sizes.long
    return ModelConfig(
        model_type="llama", vocab_size=sh.vocab, d_model=sh.d_model,
        n_layers=layers or sh.n_layers, n_heads=sh.n_heads, n_kv_heads=sh.n_kv_heads,
        head_dim=sh.d_model // sh.n_heads, mlp_dim=sh.mlp_dim,
        max_position_embeddings=max(s.slots, 4096), dtype=s.dtype, param_dtype=s.dtype,
        **FAMILY_SWITCHES["llama"],
    )  # fmt: skip


def decode_filled(sizes: Sizes) -> dict[str, Any]:
    """One jitted decode step (`forward_cached`, T = 1, the cache donated and fed back as the
    decode loop carries it) at each filled count, reading the bucket holding the filled
    slots against every allocated slot (MIN_BUCKET = the allocation: one bucket)."""
    import jax
    import jax.numpy as jnp

    from bench.attention import decode_steps
    from rlhf_jax.models.transformer import init_cache, init_params

    s = sizes.long
    config = decode_config(sizes)
    params = init_params(config, jax.random.key(0))
    compiled = decode_steps(config, params, s.decode_batch, s.slots)
    caches = {name: init_cache(config, s.decode_batch, s.slots) for name in compiled}
    ms: dict[str, dict[int, float]] = {name: {} for name in compiled}
    for n in s.filled:
        index = jnp.int32(n - 1)
        for name, c in compiled.items():

            def step(name=name, c=c, index=index):
                caches[name] = jax.block_until_ready(c(params, caches[name], index))

            ms[name][n] = _wall_ms(step, sizes.warmup, max(sizes.repeats, 5))
    lo, hi = s.filled[0], s.filled[1]

    def cell(name: str) -> str:
        return ", ".join(f"{ms[name][n]:.2f} ms at {n:,}" for n in s.filled)

    return {
        "rlhf_jax": f"bucket: {cell('bucket')}",
        "reference": f"all {s.slots:,} slots: {cell('all')}",
        "ratio": f"{ms['bucket'][hi] / ms['bucket'][lo]:.2f}x ({hi:,} / {lo:,} filled)",
        "values": {k: {str(n): v for n, v in d.items()} for k, d in ms.items()},
    }


def decode_layer_scan(sizes: Sizes) -> dict[str, Any]:
    """`generate`'s time per decode step ((N long - N short) / difference, so the prefill and
    the call's fixed costs cancel) and the compiled temporaries of the longer call, with the
    layer scan and with the unrolled layers, against the weights' bytes."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models.transformer import init_params
    from rlhf_jax.rollout import generate

    s = sizes.long
    config = decode_config(sizes, s.scan_layers)
    params = init_params(config, jax.random.key(0))
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    ids = jnp.ones((s.decode_batch, s.scan_prompt), jnp.int32)
    short, long = s.scan_new
    got: dict[str, dict[str, float]] = {}
    for name, scan in (("unrolled", False), ("layer scan", True)):
        times, temps = {}, 0
        for n in (short, long):

            def call(p, ids, n=n, scan=scan):
                key = jax.random.key(1)
                return generate(config, p, ids, ids, key, n, layer_scan=scan).tokens

            compiled = jax.jit(call).lower(params, ids).compile()
            temps = _temporaries(compiled)
            times[n] = _wall_ms(
                lambda c=compiled: jax.block_until_ready(c(params, ids)),
                sizes.warmup,
                sizes.repeats,
            )
        step = (times[long] - times[short]) / (long - short)
        got[name] = {"ms_per_step": step, "temporaries": temps}

    def cell(name: str) -> str:
        g = got[name]
        return f"{name} {g['ms_per_step']:.2f} ms/step, {size(int(g['temporaries']))} temporaries"

    ratio = got["layer scan"]["ms_per_step"] / got["unrolled"]["ms_per_step"]
    return {
        "rlhf_jax": cell("layer scan"),
        "reference": f"{cell('unrolled')} (weights {size(weights)})",
        "ratio": f"{ratio:.2f}x time",
        "values": {**got, "weights_bytes": weights},
    }


def run_decode(sizes: Sizes, workdir: Path, rec: Recorder) -> None:
    rec.run("decode_layer_scan", lambda: decode_layer_scan(sizes))
    rec.run("decode_filled", lambda: decode_filled(sizes))


# ----------------------------------------------------------------------------- plan


# Each stage planned alone (the others' steps set to 0), so that one stage failing to compile
# on the device leaves the others' figures (the first H200 run lost PPO's to an RM failure).
STAGE_ALONE = {
    "sft": ("rm.steps=0", "ppo.iterations=0"),
    "rm": ("sft.steps=0", "ppo.iterations=0"),
    "ppo": ("sft.steps=0", "rm.steps=0"),
}


def _plan_json(argv: list[str]) -> dict[str, Any]:
    """`rlhf-jax plan --json`, in this process, compiled for this process's backend."""
    from rlhf_jax.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", *argv, "--json"])
    if code:
        raise RuntimeError(f"rlhf-jax plan exited with {code}")
    return json.loads(out.getvalue())


def plan_on_device(tiny: bool) -> dict[str, Any]:
    """The 8B config's stages planned one by one on this device (at --size tiny, the
    quickstart's SFT stage: the harness, not the numbers)."""
    runs = {"sft": PLAN_TINY} if tiny else {n: (*PLAN_8B, *o) for n, o in STAGE_ALONE.items()}
    peaks: dict[str, float] = {}
    errors: dict[str, str] = {}
    plans: dict[str, Any] = {}
    for name, argv in runs.items():
        try:
            plan = _plan_json(list(argv))
        except Exception as e:  # noqa: BLE001 - the stage's cell says why
            errors[name] = one_line(e, 100)
            continue
        plans[name] = plan
        for stage, got in plan["stages"].items():
            peaks[stage] = got["peak_bytes_per_device"] / GIB
        memory = plan["device_memory_bytes"] / GIB
    if not plans:
        raise RuntimeError("; ".join(f"{n}: {e}" for n, e in errors.items()))
    cells = [f"{n} {g:.1f}" for n, g in peaks.items()] + [
        f"{n} failed: {e}" for n, e in errors.items()
    ]
    fits = all(g <= memory for g in peaks.values())
    verdict = f"{'fit' if fits else 'do NOT fit'} {memory:.1f} GiB"
    values = {"plans": plans, "peaks_gib": peaks, "errors": errors}
    if on_cpu() or tiny:
        ref, ratio = "n/a (the CPU figures are the reference)", "n/a"
    else:
        ref = ", ".join(f"{n} {g}" for n, g in CPU_CORRECTED_GIB.items()) + " GiB"
        ref = f"XLA:CPU corrected: {ref} (docs/memory.md)"
        ratio = ", ".join(
            f"{n} {peaks[n] / CPU_CORRECTED_GIB[n]:.2f}x" for n in peaks if n in CPU_CORRECTED_GIB
        )
    return {
        "rlhf_jax": f"peak GiB: {', '.join(cells)}; planned stages {verdict}",
        "reference": ref,
        "ratio": ratio or "n/a",
        "values": values,
    }


def run_plan(sizes: Sizes, workdir: Path, rec: Recorder) -> None:
    # Relative paths in the configs are the repository's.
    with contextlib.chdir(REPO):
        rec.run("plan_8b", lambda: plan_on_device(sizes.long.tiny))
