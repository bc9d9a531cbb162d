"""What a generation costs when rows end early or prompts repeat (`rollout.generate`).

Table 1, finished rows: a batch of 8 greedy rows where 7 end by their 9th token and one runs
to N, against all 8 running to N. The EOS set is picked from a free greedy run (each of the 7
rows' token at step 8, none of which the 8th row ever emits), so the rows end where the table
says. `compact=False` is the batch as it ran before compaction; `compact=True` goes on with
the live rows in half-size batches. Tokens are checked equal.

Table 2, one prefill per prompt: compiled FLOPs (`cost_analysis`) of a one-token generation
(prefill + one choice, no decode loop) for P prompts x G samples, the prompts repeated G times
(as before) against `samples_per_prompt=G`.

    python -m bench.generation_rows [--size tiny|full] [--out PATH|-]
"""

from __future__ import annotations

import sys

import numpy as np

from bench.common import Table, blocked, parser, publish, time_one
from bench.models import GPT2_6L, TINY, build_checkpoint, load_jax

ROWS, STOP = 8, 9


def _eos_set(tokens: np.ndarray) -> tuple[int, ...] | None:
    """EOS ids that end rows 0..6 by token STOP and never row 7 (None if none exist)."""
    last = set(tokens[-1].tolist())
    eos = set()
    for row in tokens[:-1]:
        picks = [t for t in row[:STOP].tolist() if t not in last]
        if not picks:
            return None
        eos.add(picks[-1])
    return tuple(sorted(eos))


def finished_rows(config, params, new_tokens: int, repeats: int) -> Table:
    import jax

    from rlhf_jax.rollout import generate

    table = Table(
        f"{ROWS} greedy rows, {new_tokens} new tokens (CPU)",
        ("case", "useful row-steps", "median s", "vs all rows to N"),
    )
    key = jax.random.key(0)
    for seed in range(50):
        ids = np.random.default_rng(seed).integers(5, config.vocab_size, (ROWS, 16))
        mask = np.ones_like(ids)
        free = generate(config, params, ids, mask, key, new_tokens, temperature=0.0)
        eos = _eos_set(np.asarray(free.tokens))
        if eos is not None:
            break
    else:
        raise RuntimeError("no EOS set ends 7 rows early and not the 8th")

    def run(eos_id, compact):
        return blocked(
            lambda: generate(
                config,
                params,
                ids,
                mask,
                key,
                new_tokens,
                temperature=0.0,
                eos_id=eos_id,
                pad_id=0,
                compact=compact,
            )
        )

    full = time_one(run(None, False), repeats=repeats)
    outs = {c: run(eos, c)() for c in (False, True)}
    np.testing.assert_array_equal(outs[True].tokens, outs[False].tokens)
    lengths = np.asarray(outs[True].mask).sum(1)
    useful = f"{int(lengths.sum())} / {ROWS * new_tokens}"
    table.add(
        "all rows to N (no EOS)", f"{ROWS * new_tokens} / {ROWS * new_tokens}", full.median, 1.0
    )
    for compact in (False, True):
        t = time_one(run(eos, compact), repeats=repeats)
        name = "7 end early, compact=" + str(compact)
        table.add(name, useful, t.median, t.median / full.median)
    table.notes.append(f"row lengths {lengths.astype(int).tolist()}")
    return table


def prefill_flops(config, params, groups: tuple[int, ...], prompt_len: int) -> Table:
    import jax
    import jax.numpy as jnp

    from rlhf_jax.rollout import SamplingSpec
    from rlhf_jax.rollout.generate import _generate

    spec = SamplingSpec.of(1, temperature=1.0)
    table = Table(
        f"prefill of 4 prompts x G samples, prompt length {prompt_len} (compiled FLOPs)",
        ("G", "repeated prompts GFLOP", "samples_per_prompt=G GFLOP", "ratio"),
    )
    ids = np.random.default_rng(0).integers(5, config.vocab_size, (4, prompt_len))

    def flops(prompt_ids, fan_out):
        lowered = _generate.lower(
            config,
            params,
            jnp.asarray(prompt_ids, jnp.int32),
            jnp.ones(prompt_ids.shape, jnp.int32),
            jax.random.key(0),
            spec=spec,
            activations=None,
            fan_out=fan_out,
        )
        return lowered.compile().cost_analysis()["flops"] / 1e9

    for g in groups:
        before, after = flops(np.repeat(ids, g, 0), 1), flops(ids, g)
        table.add(g, before, after, after / before)
    return table


def main(argv: list[str] | None = None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    tiny = args.size == "tiny"
    config, params = load_jax(build_checkpoint(TINY if tiny else GPT2_6L))
    tables = [
        finished_rows(config, params, 16 if tiny else 128, args.repeats),
        prefill_flops(config, params, (2,) if tiny else (2, 8), 8 if tiny else 64),
    ]
    return publish("generation_rows", tables, args.out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
