"""Generation throughput: `rlhf_jax.rollout.generate` against transformers' `model.generate`.

Both sides load the same random-weight checkpoint and produce exactly N new tokens per row
(no EOS stop), from random prompts of length P with an all-ones mask, greedy and sampled at
temperature 1 with no top-k / top-p truncation (transformers 5 fills an unset `top_k` with
its default 50, so `top_k=0` is passed to switch it off). PyTorch runs under
`torch.inference_mode()` with the KV cache and one thread per core.

A second table (batch 8) gives the decode-only time per generated token against the
memory-bandwidth bound: one decode step must read every weight and the KV cache at least once,
so `decode_bytes_per_step / copy_bandwidth` is the least time a step can take on this machine.

    python -m bench.generation [--size tiny|full] [--out PATH|-]
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from bench.common import Table, Timing, alternate, blocked, parser, publish, set_torch_threads
from bench.flops import copy_bandwidth, decode_bytes_per_step
from bench.models import (
    GPT2_6L,
    GPT2_6L_VOCAB50K,
    GPT2_12L,
    LLAMA,
    TINY,
    TINY_LLAMA,
    Shape,
    build_checkpoint,
)

MODES = {"greedy": 0.0, "sampled": 1.0}

MAIN_COLUMNS = (
    "shape",
    "batch",
    "mode",
    "rlhf_jax tok/s",
    "transformers tok/s",
    "ratio",
    "rlhf_jax compile s",
    "spread jax / torch",
)
DECODE_COLUMNS = (
    "shape",
    "mode",
    "rlhf_jax ms/step",
    "transformers ms/step",
    "bound ms/step",
    "rlhf_jax % of bound",
    "transformers % of bound",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    shapes: tuple[Shape, ...]
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    decode_batch: int
    copy_bytes: int  # buffer size of the bandwidth measurement
    decode_modes: tuple[str, ...] = tuple(MODES)


FULL = Plan((GPT2_6L, GPT2_12L, LLAMA, GPT2_6L_VOCAB50K), (8, 16, 32), 32, 64, 8, 512 * 2**20)
TINY_PLAN = Plan((TINY, TINY_LLAMA), (2,), 8, 16, 2, 16 * 2**20, ("greedy",))


def jax_generate(config, params, ids, mask, key, temperature: float, new_tokens: int):
    """The rlhf_jax side's call: exactly `new_tokens` tokens per row (no EOS stop); the new
    tokens [B, N]. `bench.cost` compiles the same call."""
    from rlhf_jax.rollout import generate

    out = generate(
        config,
        params,
        ids,
        mask,
        key,
        max_new_tokens=new_tokens,
        temperature=temperature,
        eos_id=None,
    )
    return out.tokens


class Sides:
    """The two generators of one checkpoint, as blocking callables."""

    def __init__(self, shape: Shape):
        import torch

        from bench.models import load_jax, load_torch

        folder = build_checkpoint(shape)
        self.config, self.params = load_jax(folder)
        self.torch_model = load_torch(folder)
        # No EOS at all on the PyTorch side: nothing to stop on, no EOS logit to suppress.
        self.torch_model.generation_config.eos_token_id = None
        self.torch_model.generation_config.pad_token_id = 0
        self.torch = torch

    def jax_fn(self, prompt: np.ndarray, temperature: float, new_tokens: int):
        import jax
        import jax.numpy as jnp

        ids = jnp.asarray(prompt, jnp.int32)
        mask = jnp.ones_like(ids)
        key = jax.random.key(0)
        return blocked(
            lambda: jax_generate(self.config, self.params, ids, mask, key, temperature, new_tokens)
        )

    def torch_fn(self, prompt: np.ndarray, temperature: float, new_tokens: int):
        torch = self.torch
        ids = torch.from_numpy(prompt.astype(np.int64))
        mask = torch.ones_like(ids)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )

        def run():
            with torch.inference_mode():
                out = self.torch_model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    use_cache=True,
                    **sampling,
                )
            if out.shape[1] != ids.shape[1] + new_tokens:
                raise RuntimeError(f"transformers produced {out.shape[1] - ids.shape[1]} tokens")
            return out

        return run


def _per_step(full: Timing, one: Timing, new_tokens: int) -> float:
    """Seconds per decode step: (median of an N-token run - median of a 1-token run) / (N-1)."""
    return max(full.median - one.median, 0.0) / (new_tokens - 1)


def run(plan: Plan, warmup: int, repeats: int) -> list[Table]:
    set_torch_threads()
    rng = np.random.default_rng(0)
    main = Table(
        f"Generation throughput: prompt {plan.prompt_len}, {plan.new_tokens} new tokens",
        MAIN_COLUMNS,
    )
    main.notes += [
        f"tok/s = batch x {plan.new_tokens} generated tokens / median seconds per "
        "`generate` call (prefill included); ratio = rlhf_jax / transformers; calls of the "
        "two sides alternate. Compile s = first rlhf_jax call minus the median call. "
        "Spread = (max - min) / median of the timed calls.",
        "Random-weight checkpoints, fp32, random prompt ids with an all-ones mask. Greedy: "
        "argmax / `do_sample=False`. Sampled: temperature 1, no top-k / top-p on either "
        "side (`top_k=0` for transformers). Both sides always emit exactly "
        f"{plan.new_tokens} tokens (rlhf_jax `eos_id=None`; transformers with no EOS id).",
    ]
    bandwidth = copy_bandwidth(plan.copy_bytes)
    decode = Table(
        f"Decode step vs the memory-bandwidth bound (batch {plan.decode_batch})", DECODE_COLUMNS
    )
    context = plan.prompt_len + plan.new_tokens / 2
    decode.notes += [
        f"ms/step = (median time of a {plan.new_tokens}-token `generate` - median time of a "
        f"1-token one) / {plan.new_tokens - 1}: the prefill, the first token and the fixed "
        "per-call cost cancel, leaving the cost of one decode step (a forward of one token "
        "per row over the KV cache, plus choosing the token). Both runs of both sides "
        "alternate.",
        f"bound = bytes a step must read (every weight once + the KV cache of the mean "
        f"context, {context:.0f} tokens; `bench.flops.decode_bytes_per_step`) / measured copy "
        f"bandwidth ({bandwidth / 1e9:.1f} GB/s, `bench.flops.copy_bandwidth`). "
        "% of bound = bound / measured: 100% would be a step limited only by memory traffic.",
    ]
    for shape in plan.shapes:
        sides = Sides(shape)
        for batch in plan.batches:
            prompt = rng.integers(3, shape.vocab, size=(batch, plan.prompt_len))
            for mode, temperature in MODES.items():
                t = alternate(
                    {
                        "jax": sides.jax_fn(prompt, temperature, plan.new_tokens),
                        "torch": sides.torch_fn(prompt, temperature, plan.new_tokens),
                    },
                    warmup,
                    repeats,
                )
                tokens = batch * plan.new_tokens
                jax_tps = tokens / t["jax"].median
                torch_tps = tokens / t["torch"].median
                main.add(
                    shape.name,
                    batch,
                    mode,
                    jax_tps,
                    torch_tps,
                    f"{jax_tps / torch_tps:.2f}x",
                    max(t["jax"].first - t["jax"].median, 0.0),
                    f"{t['jax'].spread:.2f} / {t['torch'].spread:.2f}",
                )
                if batch != plan.decode_batch or mode not in plan.decode_modes:
                    continue
                one = alternate(
                    {
                        "jax": sides.jax_fn(prompt, temperature, 1),
                        "torch": sides.torch_fn(prompt, temperature, 1),
                    },
                    warmup,
                    repeats,
                )
                bound = decode_bytes_per_step(shape, batch, math.ceil(context)) / bandwidth
                jax_step = _per_step(t["jax"], one["jax"], plan.new_tokens)
                torch_step = _per_step(t["torch"], one["torch"], plan.new_tokens)
                decode.add(
                    shape.name,
                    mode,
                    jax_step * 1e3,
                    torch_step * 1e3,
                    bound * 1e3,
                    f"{100 * bound / jax_step:.0f}%" if jax_step > 0 else "n/a",
                    f"{100 * bound / torch_step:.0f}%" if torch_step > 0 else "n/a",
                )
            for table in (main, decode):  # progress: the rows so far
                print(table.markdown(), file=sys.stderr, flush=True)
    return [main, decode]


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.size == "tiny":
        plan, warmup, repeats = TINY_PLAN, 0, min(args.repeats, 1)
    else:
        plan, warmup, repeats = FULL, args.warmup, args.repeats
    tables = run(plan, warmup, max(repeats, 1))
    return publish("generation", tables, args.out)


if __name__ == "__main__":
    main()
