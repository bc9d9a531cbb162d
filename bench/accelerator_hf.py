"""Rows 1 and 2 of the accelerator check: rlhf_jax against transformers on the same device.

One random ~1B Llama checkpoint is written once; rlhf_jax reads it through `load_hf` (fp32
and bf16), transformers keeps the PyTorch model that wrote it (the same weights), on CUDA when
there is one.

- Row 1: logits of the same random tokens, max |difference| of the logits and of the
  next-token log-probs (log-softmax taken in float64 on the host for both sides, so only the
  logits differ). fp32: rlhf_jax at matmul precision "highest" against PyTorch's default
  (TF32 off), and at JAX's default precision (TF32 on recent NVIDIA GPUs), which is what an
  fp32 run gets. bf16: bf16 weights and compute on both sides; rlhf_jax's logits are float32
  (`preferred_element_type`), transformers' are bf16, which alone is ~0.4% of a logit.
- Row 2: tokens/s of `rlhf_jax.rollout.generate` (one compiled prefill + decode loop) and of
  transformers' `model.generate` (KV cache), bf16, greedy, exactly N new tokens on both
  sides (no EOS), calls alternating (`bench.common.alternate`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from bench.accelerator_common import (
    GEN_BATCHES,
    Lazy,
    Recorder,
    Sizes,
    ensure_checkpoint,
    on_cpu,
    torch_device,
)
from bench.common import alternate, blocked
from bench.trl_setup import random_ids


class Models:
    """The checkpoint, the PyTorch model (fp32 until bf16 is asked for, then bf16 for good:
    one copy on the device at a time) and rlhf_jax's params per dtype."""

    def __init__(self, sizes: Sizes, workdir: Path):
        import torch
        import transformers

        self.folder, model = ensure_checkpoint(sizes.big, workdir, keep_model=True)
        if model is None:  # written by an earlier run in the same workdir
            model = transformers.AutoModelForCausalLM.from_pretrained(
                self.folder, dtype=torch.float32
            ).to(torch_device())
        model.eval()
        # Nothing to stop on and no EOS logit to suppress: both sides emit exactly N tokens.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        self.model, self.model_dtype = model, "float32"
        self.jax: dict[str, tuple[Any, Any]] = {}
        self.torch_logits: dict[str, np.ndarray] = {}

    def torch_model(self, dtype: str):
        import torch

        if dtype != self.model_dtype:
            if dtype != "bfloat16":
                raise RuntimeError("the PyTorch model was already cast to bf16")
            self.model = self.model.to(torch.bfloat16)
            self.model_dtype = dtype
        return self.model

    def jax_model(self, dtype: str):
        from rlhf_jax.models import load_hf

        if dtype not in self.jax:
            self.jax.clear()  # one copy of the weights on the device at a time
            self.jax[dtype] = load_hf(self.folder, dtype=dtype)
        return self.jax[dtype]

    def reference_logits(self, ids: np.ndarray, dtype: str) -> np.ndarray:
        """transformers' logits as float32 on the host, cached (fp32 before bf16)."""
        import torch

        if dtype not in self.torch_logits:
            model = self.torch_model(dtype)
            x = torch.from_numpy(ids).to(torch_device())
            with torch.inference_mode():
                out = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
            self.torch_logits[dtype] = out.float().cpu().numpy()
        return self.torch_logits[dtype]


def jax_logits(config, params, ids: np.ndarray, precision: str | None) -> np.ndarray:
    """rlhf_jax's logits (float32) under a matmul precision (None: JAX's default)."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models import forward

    # The precision is read while tracing, so each setting is traced (and compiled) inside it.
    with jax.default_matmul_precision(precision):
        fn = jax.jit(functools.partial(forward, config))
        ids_j = jnp.asarray(ids, jnp.int32)
        out = fn(params, ids_j, jnp.ones_like(ids_j))
        return np.asarray(jax.device_get(out), np.float32)


def next_token_logprobs(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log p(ids[:, t+1] | ids[:, :t+1]), in float64."""
    x = logits[:, :-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))
    picked = np.take_along_axis(x, ids[:, 1:, None], axis=-1)[..., 0]
    return picked - lse


def max_diffs(a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
    """(max |logit difference|, max |next-token log-prob difference|)."""
    logit = float(np.max(np.abs(a - b)))
    logp = float(np.max(np.abs(next_token_logprobs(a, ids) - next_token_logprobs(b, ids))))
    return logit, logp


def logits_fp32(models: Models, ids: np.ndarray) -> dict[str, Any]:
    config, params = models.jax_model("float32")
    ref = models.reference_logits(ids, "float32")
    highest = max_diffs(jax_logits(config, params, ids, "highest"), ref, ids)
    # XLA:CPU has no reduced-precision fp32 matmul: the default is "highest" there.
    default = highest if on_cpu() else max_diffs(jax_logits(config, params, ids, None), ref, ids)
    return {
        "rlhf_jax": f"max abs diff: logits {highest[0]:.2e}, log-probs {highest[1]:.2e} "
        f"(JAX default precision: {default[0]:.2e}, {default[1]:.2e})",
        "reference": f"transformers fp32 on {torch_device()} (TF32 off)",
        "ratio": "",
        "values": {
            "logit_diff": highest[0],
            "logprob_diff": highest[1],
            "default_precision_logit_diff": default[0],
            "default_precision_logprob_diff": default[1],
        },
    }


def logits_bf16(models: Models, ids: np.ndarray) -> dict[str, Any]:
    ref32 = models.reference_logits(ids, "float32")  # taken before the model turns bf16
    ref16 = models.reference_logits(ids, "bfloat16")
    config, params = models.jax_model("bfloat16")
    ours = jax_logits(config, params, ids, None)
    same = max_diffs(ours, ref16, ids)
    vs32 = max_diffs(ours, ref32, ids)
    theirs32 = max_diffs(ref16, ref32, ids)
    return {
        "rlhf_jax": f"max abs diff: logits {same[0]:.2e}, log-probs {same[1]:.2e} "
        f"(vs transformers fp32: {vs32[0]:.2e}, {vs32[1]:.2e}; transformers bf16 vs fp32: "
        f"{theirs32[0]:.2e}, {theirs32[1]:.2e})",
        "reference": f"transformers bf16 on {torch_device()}",
        "ratio": "",
        "values": {
            "logit_diff": same[0],
            "logprob_diff": same[1],
            "vs_fp32_logit_diff": vs32[0],
            "vs_fp32_logprob_diff": vs32[1],
            "transformers_bf16_vs_fp32_logit_diff": theirs32[0],
            "transformers_bf16_vs_fp32_logprob_diff": theirs32[1],
        },
    }


def jax_generate_fn(config, params, prompt: np.ndarray, new_tokens: int):
    import jax
    import jax.numpy as jnp

    from rlhf_jax.rollout import generate

    ids = jnp.asarray(prompt, jnp.int32)
    mask = jnp.ones_like(ids)
    key = jax.random.key(0)
    return blocked(
        lambda: (
            generate(
                config, params, ids, mask, key, max_new_tokens=new_tokens, temperature=0.0
            ).tokens
        )
    )


def torch_generate_fn(model, prompt: np.ndarray, new_tokens: int):
    import torch

    ids = torch.from_numpy(prompt).to(torch_device())
    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
            )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"transformers produced {out.shape[1] - ids.shape[1]} tokens")
        return out

    return run


def generation(models: Models, sizes: Sizes, batch: int, rng) -> dict[str, Any]:
    config, params = models.jax_model("bfloat16")
    model = models.torch_model("bfloat16")
    prompt = random_ids(rng, sizes.big.vocab, batch, sizes.gen_prompt)
    t = alternate(
        {
            "jax": jax_generate_fn(config, params, prompt, sizes.gen_new),
            "torch": torch_generate_fn(model, prompt, sizes.gen_new),
        },
        sizes.warmup,
        sizes.repeats,
    )
    tokens = batch * sizes.gen_new
    ours, theirs = tokens / t["jax"].median, tokens / t["torch"].median
    return {
        "rlhf_jax": f"{ours:,.0f} tok/s (first call {t['jax'].first:.1f} s, with compile)",
        "reference": f"transformers {theirs:,.0f} tok/s",
        "ratio": f"{ours / theirs:.2f}x",
        "values": {
            "jax_tokens_per_s": ours,
            "torch_tokens_per_s": theirs,
            "jax_first_s": t["jax"].first,
            "jax_median_s": t["jax"].median,
            "torch_median_s": t["torch"].median,
        },
    }


def run(sizes: Sizes, workdir: Path, rec: Recorder) -> None:
    """Rows 1 and 2, each guarded; the shared models are built by the first row needing them."""
    rng = np.random.default_rng(0)
    models = Lazy(lambda: Models(sizes, workdir), "checkpoint / models")
    ids = random_ids(rng, sizes.big.vocab, sizes.logits_batch, sizes.logits_len)
    rec.run("logits_fp32", lambda: logits_fp32(models.get(), ids))
    rec.run("logits_bf16", lambda: logits_bf16(models.get(), ids))
    for b in GEN_BATCHES:
        rec.run(f"generate_b{b}", lambda b=b: generation(models.get(), sizes, b, rng))
