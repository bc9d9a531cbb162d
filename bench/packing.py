"""What packing ranking batches saves (`rm.pack`, `dpo.pack`): tokens and compiled FLOPs.

    python -m bench.packing            # prints the markdown of docs/memory.md#packing

1. Tokens: a chosen/rejected (K = 2) length mix at max_prompt_len = max_completion_len = 512,
   lengths log-normal (prompt median 120 tokens, completion median 180, sigma 0.8, clipped to
   the budget): what real preference data looks like (long tails, most rows far below the
   cap). Real tokens, tokens the padded [N, K, L] batch computes, tokens the packed rows
   compute (`data.pack_rankings`).
2. FLOPs: XLA's cost analysis of the compiled reward-model and DPO training steps (forward +
   backward + optimizer) on the same mix scaled to a small shape (budget 64 + 64, a 4-layer
   d=256 model), padded batch against the packed rows holding the same prompts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data.pack import pack_rankings
from rlhf_jax.losses import get_loss
from rlhf_jax.models import ModelConfig, init_params, init_scalar_head
from rlhf_jax.models.heads import scalar_trunk
from rlhf_jax.steps import TrainState, make_preference_step, make_reward_step

PAD, EOS = 0, 1


def length_mix(n: int, budget: int, scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    """K = 2 ranking arrays as `encode_rankings` lays them out, lengths from the mix above
    (medians scaled by `scale` of 512)."""
    rng = np.random.default_rng(seed)
    length = 2 * budget + 1

    def draw(median, size):
        x = np.exp(rng.normal(np.log(median * scale), 0.8, size)).astype(int)
        return np.clip(x, 1, budget)

    prompts, completions = draw(120, n), draw(180, (n, 2))
    ids = np.full((n, 2, length), PAD, np.int32)
    mask = np.zeros((n, 2, length), np.float32)
    for i in range(n):
        for k in range(2):
            seq_len = prompts[i] + min(completions[i, k] + 1, budget)
            ids[i, k, :seq_len] = rng.integers(2, 500, seq_len)
            mask[i, k, :seq_len] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": np.ones((n, 2), np.float32),
        "rank": np.tile(np.array([0, 1], np.int32), (n, 1)),
        "completion_start": prompts.astype(np.int32),
    }


def token_table(n: int = 4096) -> list[str]:
    arrays = length_mix(n, 512, 1.0)
    real = int(arrays["attention_mask"].sum())
    padded = arrays["attention_mask"].size
    packed = pack_rankings(arrays)["attention_mask"].size
    return [
        f"| K = 2 mix at 512 + 512, N = {n} prompts | tokens | share real |",
        "|---|---|---|",
        f"| real tokens | {real:,} | 100% |",
        f"| padded batch computes | {padded:,} | {100 * real / padded:.0f}% |",
        f"| packed rows compute | {packed:,} | {100 * real / packed:.0f}% |",
        f"| packed / padded | {packed / padded:.3f} | |",
    ]


def _flops(step, params, batch) -> float:
    state = TrainState.create(params, optax.adam(1e-4))
    batch = jax.tree.map(jnp.asarray, batch)
    compiled = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def flops_table(n: int = 64, attention: str = "dense") -> list[str]:
    config = ModelConfig(
        model_type="llama",
        vocab_size=512,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        head_dim=64,
        mlp_dim=1024,
        max_position_embeddings=512,
        pad_token_id=PAD,
        eos_token_id=EOS,
        attention=attention,
    )
    arrays = length_mix(n, 64, 64 / 512, seed=1)
    arrays["ref_logps"] = np.zeros((n, 2), np.float32)
    packed = pack_rankings(arrays)
    trunk = init_params(config, jax.random.key(0))
    rm_params = {"trunk": scalar_trunk(trunk), "head": init_scalar_head(config, jax.random.key(1))}
    rows = [
        f"| step ({attention} attention), {n} prompts at 64 + 64 "
        "| padded | packed | packed / padded |",
        "|---|---|---|---|",
    ]
    steps = (
        ("reward model", make_reward_step(config, get_loss("reward")), rm_params),
        ("DPO", make_preference_step(config, get_loss("preference", beta=0.1)), trunk),
    )
    r, width = packed["input_ids"].shape
    for name, step, params in steps:
        a, b = _flops(step, params, arrays), _flops(step, params, packed)
        rows.append(f"| {name}: GFLOP per step | {a / 1e9:.2f} | {b / 1e9:.2f} | {b / a:.3f} |")
    rows.append(f"| rows x length | {n * 2} x {2 * 64 + 1} | {r} x {width} | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", default="dense", choices=("dense", "blocked"))
    args = parser.parse_args()
    print("\n".join(token_table()))
    print()
    print("\n".join(flops_table(attention=args.attention)))


if __name__ == "__main__":
    main()
