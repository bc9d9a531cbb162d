"""Hardware-neutral cost of every compiled step: XLA's own count of FLOPs and bytes accessed
against the model's FLOPs and a stated least number of bytes.

Nothing is timed: each step is built as its timing benchmark builds it (`bench.training`,
`bench.rl_iteration`, `bench.generation`), with zero weights of the same shapes (the count
depends on shapes only), compiled, and read with `compiled.cost_analysis()`. The table is
deterministic for a given JAX / XLA version and backend, so it can be made on a busy machine.

XLA's cost analysis counts a loop body once, whatever its trip count (the model's layers are a
`lax.scan`, generation a `while_loop`), so every loop body is also costed alone, from the
compiled HLO, and counted as many times as it runs: XLA's known trip count, or, for
generation's data-dependent loop, the number of decode steps (no EOS: every row runs to the
end).

    python -m bench.cost [--size tiny|full] [--out PATH|-]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench import generation, rl_iteration, training, trl_setup
from bench.common import DEFAULT_OUT, Table, publish
from bench.flops import decode_bytes_per_step, forward_flops_per_token, train_flops
from bench.models import Shape
from bench.scaling import model_config

if TYPE_CHECKING:
    from jax.stages import Compiled

COLUMNS = (
    "step",
    "model",
    "compiled GFLOP",
    "model GFLOP",
    "compiled / model",
    "bytes accessed GB",
    "minimum GB",
    "accessed / minimum",
    "FLOP / byte",
)
BYTES = 4  # fp32 everywhere in these benchmarks


# ----------------------------------------------------------------------------- XLA's count


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.bytes - other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)


@dataclasses.dataclass(frozen=True)
class Callee:
    """A computation that `parent` runs as a whole: a while loop's body (`runs` = XLA's known
    trip count, None when it depends on the data) or a `call` (XLA:CPU wraps small loops in
    one; runs = 1). Fused computations are not callees: they are part of their op's cost."""

    parent: str
    name: str
    runs: int | None


_HEADER = re.compile(r"^(ENTRY )?%([^\s(]+) \(")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%([^\s,]+)")
_CALL = re.compile(r"\bcall\(.*?\bto_apply=%([^\s,]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def as_cost(properties: dict | list) -> Cost:
    """`Cost` of a `cost_analysis()` result (a dict; older JAX: a one-element list of dicts)."""
    if isinstance(properties, list | tuple):
        (properties,) = properties
    return Cost(float(properties.get("flops", 0.0)), float(properties.get("bytes accessed", 0.0)))


def hlo_callees(hlo: str) -> tuple[str, list[Callee]]:
    """(entry computation, every loop body and called computation) of an HLO module's text."""
    entry, current, callees = "", "", []
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            entry = current if header.group(1) else entry
        elif loop := _WHILE.search(line):
            trips = _TRIPS.search(line)
            callees.append(Callee(current, loop.group(1), int(trips.group(1)) if trips else None))
        elif call := _CALL.search(line):
            callees.append(Callee(current, call.group(1), 1))
    return entry, callees


def _with_entry(hlo: str, name: str) -> str:
    """The module's text with computation `name` as its entry (the layout header dropped:
    it describes the old entry's parameters)."""
    out = []
    for line in hlo.splitlines():
        if line.startswith("HloModule "):
            line = line.split(",", 1)[0]
        elif line.startswith("ENTRY "):
            line = line.removeprefix("ENTRY ")
        elif line.startswith(f"%{name} ("):
            line = "ENTRY " + line
        out.append(line)
    return "\n".join(out)


def computation_cost(compiled: Compiled, name: str, hlo: str | None = None) -> Cost:
    """XLA's cost of one computation of a compiled module (its own loops counted once), by
    re-reading the module's text (`hlo`, default `compiled.as_text()`) with that computation
    as the entry."""
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    module = _hlo.hlo_module_from_text(_with_entry(hlo or compiled.as_text(), name))
    client = compiled.runtime_executable().client
    return as_cost(xla_client._xla.hlo_module_cost_analysis(client, module))


def _one_run(
    costs: Callable[[str], Cost], name: str, callees: list[Callee], data_trips: int | None
) -> Cost:
    """One run of computation `name`, each loop in it counted as often as it runs: XLA's
    count of `name` holds each callee once, so that once is swapped for runs x one run of
    the callee (recursively, for nested loops)."""
    cost = costs(name)
    for c in callees:
        if c.parent != name:
            continue
        runs = c.runs if c.runs is not None else data_trips
        if runs is None:
            raise ValueError(f"loop {c.name} has no known trip count; pass data_trips")
        cost = cost - costs(c.name) + _one_run(costs, c.name, callees, data_trips) * runs
    return cost


def _costs(compiled: Compiled) -> tuple[str, list[Callee], Callable[[str], Cost]]:
    """(entry, callees, cached XLA cost of a computation by name) of a compiled executable."""
    hlo = compiled.as_text()
    entry, callees = hlo_callees(hlo)
    known = {entry} | {c.name for c in callees}
    stray = [c for c in callees if c.parent not in known]
    if stray:  # e.g. a loop in a conditional's branch: how often it runs is unknown here
        raise NotImplementedError(f"loops outside the entry, loop bodies and calls: {stray}")

    @functools.cache
    def costs(name: str) -> Cost:
        if name == entry:
            return as_cost(compiled.cost_analysis())
        return computation_cost(compiled, name, hlo)

    return entry, callees, costs


def compiled_cost(compiled: Compiled, data_trips: int | None = None) -> Cost:
    """XLA's FLOPs and bytes accessed of one call, every loop body counted as often as it runs.

    `data_trips`: the trip count of the one loop XLA cannot count (generation's while_loop).
    """
    entry, callees, costs = _costs(compiled)
    unknown = [c.name for c in callees if c.runs is None]
    if len(unknown) > 1:  # data_trips would be a guess for all but one of them
        raise ValueError(f"several data-dependent loops: {unknown}")
    return _one_run(costs, entry, callees, data_trips)


def data_loop_body_cost(compiled: Compiled) -> Cost:
    """XLA's cost of one run of the body of the module's single data-dependent loop
    (generation: one decode step, exactly as the compiled loop runs it)."""
    _, callees, costs = _costs(compiled)
    (loop,) = [c for c in callees if c.runs is None]
    return _one_run(costs, loop.name, callees, None)


# ----------------------------------------------------------------------------- accounting


def head_flops(shape: Shape) -> float:
    """The LM head of one token."""
    return 2.0 * shape.vocab * shape.d_model


def trunk_flops(shape: Shape, context: int) -> float:
    """One token through the trunk (plus a scalar head) in a forward over `context` tokens."""
    return forward_flops_per_token(shape, context, lm_head=False)


def weight_bytes(shape: Shape) -> int:
    """Every weight a forward reads (the position table: only the rows used, ~0)."""
    return decode_bytes_per_step(shape, batch=1, context=0)


def train_min_bytes(shape: Shape, rows: int, seq: int) -> int:
    """Least traffic of one forward + backward + AdamW update of a model: weights read, the
    gradient written and read, both moments read and written, weights written (8 values per
    parameter), plus each layer's input activations [rows, seq, d] written by the forward and
    read by the backward (what even full rematerialisation must keep)."""
    params = 8 * shape.n_params(with_embeddings=True)
    activations = 2 * shape.n_layers * rows * seq * shape.d_model
    return BYTES * (params + activations)


def mean_context(prompt: int, new: int) -> int:
    """The mean number of tokens a decode step attends to (`bench.generation`'s bound)."""
    return prompt + math.ceil(new / 2)


def generation_flops(shape: Shape, rows: int, prompt: int, new: int) -> float:
    """Prefill of the prompt (LM head on its last token only), then new - 1 one-token decode
    steps at the mean context, each with its LM head."""
    prefill = rows * prompt * trunk_flops(shape, prompt)
    decode = rows * (new - 1) * trunk_flops(shape, mean_context(prompt, new))
    return prefill + decode + rows * new * head_flops(shape)


def generation_min_bytes(shape: Shape, rows: int, prompt: int, new: int) -> int:
    """The prefill reads every weight once; each decode step reads them again plus the KV
    cache of the mean context (`decode_bytes_per_step`)."""
    context = mean_context(prompt, new)
    return weight_bytes(shape) + (new - 1) * decode_bytes_per_step(shape, rows, context)


# ----------------------------------------------------------------------------- the steps


@dataclasses.dataclass(frozen=True)
class Row:
    step: str
    model: str
    compiled: Cost
    model_flops: float
    min_bytes: float


def zero_model(shape: Shape) -> tuple:
    """(ModelConfig, zero weights) of `shape`: the same config `load_jax` reads from the
    benchmarks' checkpoints; the values do not change the compiled program."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.models import param_shapes

    cfg = model_config(shape)
    return cfg, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes(cfg))


def compile_step(fn: Callable, *args) -> Compiled:
    return fn.lower(*args).compile()


def training_rows(sizes: training.Sizes) -> list[Row]:
    """SFT and reward-model steps of `bench.training` for each of its shapes."""
    import jax

    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    rows = []
    for shape in sizes.shapes:
        cfg, params = zero_model(shape)
        b, t = sizes.sft_batch, sizes.sft_len
        ids = trl_setup.random_ids(rng, shape.vocab, b, t)
        step, state, batch = training.jax_sft_step(cfg, params, ids)
        rows.append(
            Row(
                f"SFT step ({b} x {t})",
                shape.name,
                compiled_cost(compile_step(step, state, batch, key)),
                train_flops(shape, b, t, lm_head=True),
                train_min_bytes(shape, b, t),
            )
        )
        b, length = sizes.rm_batch, sizes.rm_prompt + sizes.rm_completion
        chosen, rejected = trl_setup.random_ids(rng, shape.vocab, 2, b, length)
        step, state, batch = training.jax_rm_step(cfg, params, chosen, rejected)
        rows.append(
            Row(
                f"RM step ({b} x 2 x {length})",
                shape.name,
                compiled_cost(compile_step(step, state, batch, key)),
                train_flops(shape, 2 * b, length, lm_head=False),
                train_min_bytes(shape, 2 * b, length),
            )
        )
        del state, params
    return rows


def rl_rows(s: rl_iteration.Sizes) -> list[Row]:
    """PPO experience and update, GRPO update, as `bench.rl_iteration` builds them."""
    import jax

    shape = s.shape
    cfg, params = zero_model(shape)
    unique = trl_setup.random_ids(np.random.default_rng(0), shape.vocab, s.prompts, s.prompt_len)
    rows_n, seq = s.prompts * s.completions, s.prompt_len + s.new_tokens
    where = f"{rows_n} x {s.prompt_len}+{s.new_tokens}"
    # forward FLOPs over the full sequences: trunk (+ scalar head), LM head on the N response
    # positions only (`response_logits`)
    trunk = rows_n * seq * trunk_flops(shape, seq)
    heads = rows_n * s.new_tokens * head_flops(shape)
    out = []
    for algorithm in ("ppo", "grpo"):
        rl = rl_iteration.JaxRL(cfg, params, unique, s, algorithm)
        args = (rl.state, rl.frozen, rl.prompt_ids, rl.prompt_mask, rl.key)
        if algorithm == "ppo":
            # generation, then reference (LM head), value and reward forwards
            out.append(
                Row(
                    f"PPO experience ({where})",
                    shape.name,
                    compiled_cost(compile_step(rl.experience, *args), s.new_tokens - 1),
                    generation_flops(shape, rows_n, s.prompt_len, s.new_tokens) + 3 * trunk + heads,
                    generation_min_bytes(shape, rows_n, s.prompt_len, s.new_tokens)
                    + 3 * weight_bytes(shape),
                )
            )
        exp, _ = jax.eval_shape(rl.experience, *args)
        trained = 2 if algorithm == "ppo" else 1  # PPO: policy + value model; GRPO: policy
        out.append(
            Row(
                f"{algorithm.upper()} update ({where})",
                shape.name,
                compiled_cost(compile_step(rl.update, rl.state, exp, None, rl.key)),
                3 * (trained * trunk + heads),
                trained * train_min_bytes(shape, rows_n, seq),
            )
        )
        del rl
    return out


def _generate_fn(cfg, temperature: float, new_tokens: int) -> Callable:
    """`bench.generation`'s rlhf_jax call, jitted over (params, prompt ids, key)."""
    import jax
    import jax.numpy as jnp

    def run(params, ids, key):
        return generation.jax_generate(
            cfg, params, ids, jnp.ones_like(ids), key, temperature, new_tokens
        )

    return jax.jit(run)


def decode_rows(plan: generation.Plan) -> list[Row]:
    """One decode step of `bench.generation`'s decode table: the body of the compiled
    `generate` loop (the one-token forward over the KV cache and choosing the token)."""
    import jax
    import jax.numpy as jnp

    b, p, n = plan.decode_batch, plan.prompt_len, plan.new_tokens
    context = mean_context(p, n)
    rows = []
    for shape in plan.shapes:
        cfg, params = zero_model(shape)
        ids = jnp.zeros((b, p), jnp.int32)
        for mode in plan.decode_modes:
            fn = _generate_fn(cfg, generation.MODES[mode], n)
            compiled = compile_step(fn, params, ids, jax.random.key(0))
            rows.append(
                Row(
                    f"decode step, {mode} (batch {b}, context {context} of {p + n - 1})",
                    shape.name,
                    data_loop_body_cost(compiled),
                    b * forward_flops_per_token(shape, context, lm_head=True),
                    decode_bytes_per_step(shape, b, context),
                )
            )
    return rows


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Plan:
    training: training.Sizes
    rl: rl_iteration.Sizes
    generation: generation.Plan


PLANS = {
    "full": Plan(training.SIZES["full"], rl_iteration.SIZES["full"], generation.FULL),
    "tiny": Plan(training.SIZES["tiny"], rl_iteration.SIZES["tiny"], generation.TINY_PLAN),
}


def rows_of(plan: Plan) -> list[Row]:
    parts = ((training_rows, plan.training), (rl_rows, plan.rl), (decode_rows, plan.generation))
    rows = []
    for build, sizes in parts:
        rows += build(sizes)
        print(f"done: {build.__name__}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> Table:
    t = Table("Compiled cost per step (XLA cost analysis, fp32)", COLUMNS)
    for r in rows:
        c = r.compiled
        t.add(
            r.step,
            r.model,
            c.flops / 1e9,
            r.model_flops / 1e9,
            f"{c.flops / r.model_flops:.2f}x",
            c.bytes / 1e9,
            r.min_bytes / 1e9,
            f"{c.bytes / r.min_bytes:.2f}x",
            c.flops / c.bytes,
        )
    t.notes += NOTES
    return t


NOTES = [
    "Compiled = `jax.jit(step).lower(*args).compile().cost_analysis()` of the step as its "
    "timing benchmark builds it (`bench.training`, `bench.rl_iteration`, `bench.generation`; "
    "zero weights of the same shapes), with every loop body costed alone from the compiled "
    "HLO and counted as often as it runs: XLA's own total counts each body once, i.e. one "
    "layer of the layer scan and one decode step of generation. The decode step is one run "
    "of the body of the compiled `generate` loop, exactly as it runs there. FLOP / byte = "
    "compiled FLOPs / bytes accessed (arithmetic intensity).",
    "Model FLOPs (`bench/flops.py`: 2 per weight multiply-accumulate, attention 2 x 2 x T x d "
    "per token per layer with the causal mask not discounted, training = 3 x forward): "
    "SFT = `train_flops` with the LM head; RM = `train_flops` of the 2B sequences with a "
    "scalar head; PPO experience = generation (prompt prefill, LM head on its last token, then "
    "N - 1 one-token decode steps at the mean context P + N/2, each with the LM head) + "
    "reference, value and reward forwards over the P + N tokens (the reference's LM head on "
    "the N response positions only, as `response_logits` does); update = 3 x the forwards of "
    "the trained models over P + N tokens (PPO: policy with its LM head on the N response "
    "positions + value model; GRPO: the policy alone); decode step = batch x one token's "
    "forward at the mean context, LM head included. compiled / model above 1 is work the "
    "model count does not ask for: rematerialisation (the layer body is checkpointed with "
    "`dots_saveable`, so the backward recomputes the elementwise ops, not the matmuls), "
    "elementwise ops (norms, softmax, GELU, AdamW: XLA counts 1 FLOP per element), masked "
    "attention over padding.",
    "Minimum bytes, a stated lower bound, 4-byte values: training step = per trained model "
    "8 x parameters (weights read, gradient written and read, AdamW's two moments read and "
    "written, weights written) + 2 x layers x rows x tokens x d_model (each layer's input, "
    "written by the forward and read by the backward); PPO experience = the weights read "
    "once by the prefill and by each scoring forward (reference, value, reward) + (N - 1) x "
    "`decode_bytes_per_step` at the mean context; decode step = `decode_bytes_per_step` "
    "(every weight once + the KV cache of the mean context). Logits, attention "
    "probabilities and other intermediates are not in the minimum.",
    "Bytes accessed is XLA:CPU's count: for each HLO instruction after fusion, the bytes of "
    "its operands and its output. A fused chain counts its inputs and output once; every "
    "intermediate left unfused counts again each time it is written and read; a weight read "
    "by several ops counts once per op. So accessed / minimum is the traffic the compiled "
    "program implies beyond the least it could move (no cache is modelled: it is not the "
    "DRAM traffic a machine would measure). Two known overcounts: a gather counts its whole "
    "table (the token-embedding lookup of a decode step counts all vocab x d_model values, "
    "103 MB at 50257 x 512, though it reads 8 rows: most of the decode rows' excess), and "
    "the decode step's cache holds P + N - 1 slots, as `generate` allocates it, and attends "
    "over all of them (masked) while the minimum counts the mean context only.",
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "full"), default="full")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="markdown file to update ('-' prints only)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    return publish("cost", [table(rows_of(PLANS[args.size]))], args.out)


if __name__ == "__main__":
    main()
