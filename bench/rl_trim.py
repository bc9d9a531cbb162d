"""What trimming and packing the RL update save (`ppo.trim_update`, `ppo.pack_update`):
tokens the trunk computes, and compiled FLOPs.

    python -m bench.rl_trim            # prints the markdown of docs/memory.md#packing

1. Tokens: iterations of 64 responses whose prompt and response lengths are log-normal
   (prompt median 120 tokens, response median 180, sigma 0.8: `bench.packing`'s mix), clipped
   to the budgets. Per iteration the padded update computes 64 x (P + N) tokens, the trimmed
   one 64 x (bucket(longest prompt) + bucket(longest response)); packed, each minibatch of 16
   (one epoch's shuffle) is packed first fit decreasing into rows of the (trimmed) length,
   and every minibatch computes the power-of-two bucket of the most rows any of them needs
   (`steps/rl_pack.py`, `loops/packed_update.py`): 4 x rows x length. The mean over 200
   iterations, at a budget that the tails reach (512 + 512) and at a generous one
   (512 + 2048).
2. FLOPs: XLA's cost analysis of the compiled PPO update (policy and critic, forward,
   backward and Adam over one epoch of 4 minibatches; a 2-layer d=128 Llama-style model) at
   the full budget, at every bucket the mix scaled by 1/8 reaches (budgets 64 + 256) trimmed,
   and at every packed layout it reaches packed (untrimmed: packed rows for the trunks,
   response slots for the LM and value heads), then the means over the iterations.
3. The same means with finer buckets (`ppo.buckets_per_doubling` 1, 2, 4: 2 adds 1.5x
   between the powers of two) and the number of update programs each compiles.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import OptimConfig, PPOConfig
from rlhf_jax.models import ModelConfig, init_params, init_scalar_head
from rlhf_jax.models.heads import scalar_trunk
from rlhf_jax.steps import Experience, RLAlgorithm, init_rl_state, make_optimizer, make_update_fn
from rlhf_jax.steps.rl_pack import PackLayout
from rlhf_jax.steps.rl_trim import bucket, trimmed_lengths

ROWS, ITERATIONS, MINIBATCH = 64, 200, 16


def draw_lengths(budgets: tuple[int, int], scale: float, seed: int = 0) -> np.ndarray:
    """[ITERATIONS, ROWS, 2] (prompt, response) lengths of the mix, medians scaled by `scale`."""
    rng = np.random.default_rng(seed)
    medians = np.array([120.0, 180.0]) * scale
    x = np.exp(rng.normal(np.log(medians), 0.8, (ITERATIONS, ROWS, 2))).astype(int)
    return np.clip(x, 1, np.array(budgets))


def buckets_of(
    lengths: np.ndarray, budgets: tuple[int, int], per_doubling: int = 1
) -> list[tuple[int, int]]:
    """Each iteration's (prompt, response) columns under `ppo.trim_update`."""
    longest = lengths.max(axis=1)
    return [trimmed_lengths((int(p), int(n)), *budgets, per_doubling) for p, n in longest]


def first_fit_rows(lengths: list[int], capacity: int) -> int:
    """Rows first fit decreasing needs for `lengths` in rows of `capacity` (as
    `steps.rl_pack.first_fit`: longest first, each into the first row with room)."""
    fills: list[int] = []
    for length in sorted(lengths, reverse=True):
        for i, fill in enumerate(fills):
            if fill + length <= capacity:
                fills[i] += length
                break
        else:
            fills.append(length)
    return len(fills)


def packed_rows(lengths: np.ndarray, capacity: int, seed: int, per_doubling: int = 1) -> int:
    """The packed rows per minibatch of one iteration (`lengths` [ROWS, 2]): its rows
    shuffled into minibatches of MINIBATCH, the most any of them needs, rounded up to its
    bucket (at most MINIBATCH)."""
    order = np.random.default_rng(seed).permutation(ROWS).reshape(-1, MINIBATCH)
    total = lengths.sum(axis=1)
    need = max(first_fit_rows(list(total[mb]), capacity) for mb in order)
    return bucket(need, MINIBATCH, per_doubling)


def response_slots(lengths: np.ndarray, n: int, seed: int, per_doubling: int = 1) -> int:
    """The LM head's response slots per minibatch of one iteration: the most real response
    tokens any minibatch (the same shuffle as `packed_rows`) holds, rounded up to its bucket
    (at most MINIBATCH x n)."""
    order = np.random.default_rng(seed).permutation(ROWS).reshape(-1, MINIBATCH)
    need = max(int(lengths[mb, 1].sum()) for mb in order)
    return bucket(need, MINIBATCH * n, per_doubling)


def _share(real: float, tokens: float) -> str:
    return f"{tokens:,.0f} ({100 * real / tokens:.0f}% real)"


def token_table() -> list[str]:
    rows = [
        f"| {ROWS} responses per iteration, mean of {ITERATIONS} | real | padded update "
        "| trimmed | packed | trimmed + packed | packed / padded |",
        "|---|---|---|---|---|---|---|",
    ]
    n_mb = ROWS // MINIBATCH
    for budgets in ((512, 512), (512, 2048)):
        lengths = draw_lengths(budgets, 1.0)
        real = lengths.sum(axis=(1, 2)).mean()
        padded = ROWS * sum(budgets)
        cut = buckets_of(lengths, budgets)
        trimmed = np.mean([ROWS * (p + n) for p, n in cut])
        packed = np.mean(
            [n_mb * packed_rows(x, sum(budgets), i) * sum(budgets) for i, x in enumerate(lengths)]
        )
        both = np.mean(
            [n_mb * packed_rows(x, p + n, i) * (p + n) for i, (x, (p, n)) in enumerate(
                zip(lengths, cut))]
        )  # fmt: skip
        rows.append(
            f"| budget {budgets[0]} + {budgets[1]}: tokens | {real:,.0f} | {_share(real, padded)} "
            f"| {_share(real, trimmed)} | {_share(real, packed)} | {_share(real, both)} "
            f"| {packed / padded:.3f} |"
        )
    return rows


def _experience(p: int, n: int, seed: int = 0) -> Experience:
    """A full (every token real) experience of ROWS rows in p + n columns: the FLOPs of a
    program do not depend on the values."""
    rng = np.random.default_rng(seed)
    ones = jnp.ones((ROWS, n), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(ROWS, n)), jnp.float32)
    ids = jnp.asarray(rng.integers(2, 500, (ROWS, p + n)), jnp.int32)
    return Experience(
        ids, jnp.ones((ROWS, p + n), jnp.float32), ids[:, p:], ones, noise - 2.0, None,
        noise, noise, noise, noise, jnp.zeros((ROWS,), jnp.float32), None,
        jnp.arange(ROWS, dtype=jnp.int32),
    )  # fmt: skip


@functools.cache  # the tables compile each shape once
def update_flops(p: int, n: int, packed: tuple[int, int] | None = None) -> float:
    """GFLOP of one compiled PPO update (critic, KL in the reward) on ROWS rows of p + n;
    with `packed` (rows, slots), its trunks on that many packed rows per minibatch and its
    heads on that many response slots."""
    config = ModelConfig(
        model_type="llama", vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4,
        head_dim=32, mlp_dim=512, max_position_embeddings=512,
    )  # fmt: skip
    optim = OptimConfig(lr=1e-5)
    ppo = PPOConfig(
        rollout_batch=ROWS, minibatch_size=MINIBATCH, epochs=1, max_prompt_len=p, max_new_tokens=n,
        policy_optim=optim, value_optim=optim, ema_decay=0.0,
    )  # fmt: skip
    algo = RLAlgorithm.from_config(ppo)
    policy = init_params(config, jax.random.key(0))
    critic = {"trunk": scalar_trunk(policy), "head": init_scalar_head(config, jax.random.key(1))}
    tx = make_optimizer(optim, 4)
    state = init_rl_state(policy, critic, tx, tx, ppo)
    pack = None if packed is None else PackLayout(1, *packed)
    fn = make_update_fn(config, config, ppo, algo, pack=pack)
    lowered = jax.jit(fn).lower(state, _experience(p, n), None, jax.random.key(0))
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) / 1e9


def flops_table(budgets: tuple[int, int] = (64, 256)) -> list[str]:
    lengths = draw_lengths(budgets, 1 / 8, seed=1)
    seen = collections.Counter(buckets_of(lengths, budgets))
    full = update_flops(*budgets)
    rows = [
        f"| PPO update, {ROWS} rows, budget {budgets[0]} + {budgets[1]} (mix x 1/8) "
        "| iterations | GFLOP | / padded |",
        "|---|---|---|---|",
        f"| padded: {budgets[0]} + {budgets[1]} | (all) | {full:.2f} | 1.000 |",
    ]
    mean = 0.0
    for (p, n), count in sorted(seen.items()):
        g = update_flops(p, n)
        mean += g * count / ITERATIONS
        rows.append(f"| trimmed: {p} + {n} | {count} | {g:.2f} | {g / full:.3f} |")
    rows.append(f"| trimmed, mean over the iterations | {ITERATIONS} | {mean:.2f} "
                f"| {mean / full:.3f} |")  # fmt: skip
    packs = collections.Counter(
        (packed_rows(x, sum(budgets), i), response_slots(x, budgets[1], i))
        for i, x in enumerate(lengths)
    )
    mean = 0.0
    for (r, t), count in sorted(packs.items()):
        g = update_flops(*budgets, packed=(r, t))
        mean += g * count / ITERATIONS
        rows.append(
            f"| packed: {r} of {MINIBATCH} rows, {t:,} of {MINIBATCH * budgets[1]:,} response "
            f"slots per minibatch | {count} | {g:.2f} | {g / full:.3f} |"
        )
    rows.append(f"| packed, mean over the iterations | {ITERATIONS} | {mean:.2f} "
                f"| {mean / full:.3f} |")  # fmt: skip
    return rows


def finer_buckets_table(budgets: tuple[int, int] = (64, 256)) -> list[str]:
    """The same iterations' means with `ppo.buckets_per_doubling` 1, 2 and 4, and how many
    update programs each compiles over them."""
    lengths = draw_lengths(budgets, 1 / 8, seed=1)
    full = update_flops(*budgets)
    rows = [
        f"| `ppo.buckets_per_doubling`, budget {budgets[0]} + {budgets[1]} (mix x 1/8) "
        "| trimmed: programs | trimmed / padded | packed: programs | packed / padded |",
        "|---|---|---|---|---|",
    ]
    for k in (1, 2, 4):
        trims = collections.Counter(buckets_of(lengths, budgets, k))
        packs = collections.Counter(
            (packed_rows(x, sum(budgets), i, k), response_slots(x, budgets[1], i, k))
            for i, x in enumerate(lengths)
        )
        trimmed = sum(update_flops(*s) * c for s, c in trims.items()) / ITERATIONS
        packed = sum(update_flops(*budgets, packed=s) * c for s, c in packs.items()) / ITERATIONS
        rows.append(
            f"| {k} | {len(trims)} | {trimmed / full:.3f} | {len(packs)} | {packed / full:.3f} |"
        )
    return rows


def main() -> None:
    print("\n".join(token_table()))
    print()
    print("\n".join(flops_table()))
    print()
    print("\n".join(finer_buckets_table()))


if __name__ == "__main__":
    main()
