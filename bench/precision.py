"""What each precision switch costs in accuracy: log-prob differences against float32.

    python -m bench.precision --model OUT/sft --data OUT/data/sft.jsonl [--rows 64]
    python -m bench.precision --random 12x768      # a random Llama of that depth x width

On the same tokens (the data's prompt + completion rows, or random ones), the teacher-forced
log-probs of every token under each switch are compared with float32 storage and compute:

- `model.frozen_dtype=bfloat16`: weights stored in bf16, computed in float32 (RL's reference
  and reward model, and a LoRA policy's base);
- `model.dtype=bfloat16`: float32 weights, bf16 compute (logits, log-probs, losses in fp32);
- both at once;
- `optim.mu_dtype=bfloat16`: two copies of the model trained `--steps` SFT steps from the
  same start on the same batches, one with Adam's first moment in bf16; the difference of
  their log-probs (a same-settings rerun differs by exactly 0: the steps are deterministic).

Printed: max and mean |delta log p| per token, and the mean |delta| of a sequence's summed
log-prob (what a KL estimate or a DPO margin sees).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import Table, command_line, machine_lines
from rlhf_jax.config import OptimConfig
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig, forward, init_params, load_hf, load_tokenizer
from rlhf_jax.models.config import FAMILY_SWITCHES
from rlhf_jax.ops import next_token_logprobs
from rlhf_jax.steps import TrainState, make_optimizer, make_sft_step


def _rows(model: str, data: str, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokenizer = load_tokenizer(model)
    ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    with open(data, encoding="utf-8") as f:
        for i, line in zip(range(n), f):
            row = json.loads(line)
            toks = tokenizer(row["prompt"] + row["completion"])["input_ids"][:length]
            ids[i, : len(toks)], mask[i, : len(toks)] = toks, 1
    return ids, mask


def _random_model(shape: str, n: int, length: int):
    depth, width = (int(x) for x in shape.split("x"))
    cfg = ModelConfig(
        model_type="llama", vocab_size=32000, d_model=width, n_layers=depth,
        n_heads=width // 64, n_kv_heads=width // 64, head_dim=64, mlp_dim=4 * width,
        max_position_embeddings=length, **FAMILY_SWITCHES["llama"],
    )  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (n, length), 0, cfg.vocab_size))
    return cfg, params, ids.astype(np.int32), np.ones((n, length), np.int32)


def _logps(cfg: ModelConfig, params, ids, mask) -> np.ndarray:
    fn = jax.jit(lambda p: next_token_logprobs(forward(cfg, p, ids, mask), ids))
    return np.asarray(fn(params), np.float64)


def _compare(ref: np.ndarray, other: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    target = mask[:, 1:] > 0
    diff = np.abs(other - ref)
    seq = np.abs(np.sum((other - ref) * target, axis=1))
    return {
        "max |dlogp| per token": float(diff[target].max()),
        "mean |dlogp| per token": float(diff[target].mean()),
        "mean |dlogp| per sequence": float(seq.mean()),
    }


def _trained(cfg: ModelConfig, params, ids, mask, steps: int, mu_dtype: str | None):
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, mu_dtype=mu_dtype), steps)
    step = jax.jit(make_sft_step(cfg, get_loss("sft")), donate_argnums=0)
    state = TrainState.create(jax.tree.map(jnp.array, params), tx)
    half = len(ids) // 2
    for i in range(steps):  # alternate the two halves: the same batches for both runs
        rows = slice(0, half) if i % 2 == 0 else slice(half, 2 * half)
        batch = {"input_ids": ids[rows], "attention_mask": mask[rows], "loss_mask": mask[rows]}
        state, _ = step(state, batch, jax.random.key(i))
    return state.params


def measure(cfg: ModelConfig, params, ids, mask, steps: int) -> list[list[str]]:
    ref = _logps(cfg, params, ids, mask)
    to_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    bf16_compute = cfg.replace(dtype="bfloat16")
    variants = [
        ("model.frozen_dtype=bfloat16 (bf16 storage, fp32 compute)", cfg, to_bf16),
        ("model.dtype=bfloat16 (fp32 storage, bf16 compute)", bf16_compute, params),
        ("both (bf16 storage and compute)", bf16_compute, to_bf16),
    ]
    rows = []
    for name, c, p in variants:
        diffs = _compare(ref, _logps(c, p, ids, mask), mask)
        rows.append([name, *(f"{v:.2e}" for v in diffs.values())])
    if steps:
        a = _trained(cfg, params, ids, mask, steps, None)
        b = _trained(cfg, params, ids, mask, steps, "bfloat16")
        diffs = _compare(_logps(cfg, a, ids, mask), _logps(cfg, b, ids, mask), mask)
        rows.append(
            [f"optim.mu_dtype=bfloat16 ({steps} SFT steps)", *(f"{v:.2e}" for v in diffs.values())]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model folder (e.g. OUT/sft)")
    p.add_argument("--data", help="JSONL of {prompt, completion} rows for --model")
    p.add_argument("--random", help="DEPTHxWIDTH of a random Llama instead, e.g. 12x768")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--length", type=int, default=48)
    p.add_argument("--steps", type=int, default=100, help="SFT steps of the mu_dtype row")
    args = p.parse_args(argv)
    if args.random:
        cfg, params, ids, mask = _random_model(args.random, args.rows, args.length)
        what = f"random Llama {args.random}, vocab 32000, {args.rows} x {args.length} random tokens"
    elif args.model and args.data:
        cfg, params = load_hf(args.model)
        ids, mask = _rows(args.model, args.data, args.rows, args.length)
        what = f"{args.model}, {args.rows} rows of {args.data} (up to {args.length} tokens)"
    else:
        p.error("give --model and --data, or --random")
    table = Table(
        f"log-prob differences against float32: {what}",
        ["switch", "max abs dlogp / token", "mean abs dlogp / token", "mean abs dlogp / sequence"],
        measure(cfg, params, ids, mask, args.steps),
    )
    print("\n".join(machine_lines()))
    print(f"- command: `{command_line()}`\n\n{table.title}\n\n{table.markdown()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
