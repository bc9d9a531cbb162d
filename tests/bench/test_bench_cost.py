"""bench.cost: its reading of XLA's cost analysis against hand-computed FLOPs (loops counted as
often as they run), and the tiny plan's table: compiled FLOPs near the model's, bytes above
the stated minimum, a well-formed section."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tiny_run import run_tiny  # noqa: E402

from bench import cost  # noqa: E402

M, K, N = 64, 32, 48
LAYERS = 5


def matmul_flops() -> float:
    return 2.0 * M * K * N


def compiled(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(fn).lower(*args).compile()


def test_matmul_is_2mkn():
    c = compiled(lambda a, b: a @ b, (M, K), (K, N))
    assert cost.compiled_cost(c).flops == matmul_flops()
    # operands and result read / written once: nothing else to move
    assert cost.compiled_cost(c).bytes == 4 * (M * K + K * N + M * N)


def layers(ws, x):
    """LAYERS square matmuls in a scan: XLA's own total counts the body once."""
    return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]


def test_scan_body_counted_per_layer():
    c = compiled(layers, (LAYERS, K, K), (M, K))
    one = 2.0 * M * K * K
    assert cost.as_cost(c.cost_analysis()).flops < 2 * one  # XLA alone: one layer
    flops = cost.compiled_cost(c).flops
    assert LAYERS * one <= flops <= LAYERS * one + 100  # + the loop counter's adds


def test_nested_loops_multiply():
    c = compiled(
        lambda ws, x: jax.lax.scan(lambda h, _: (layers(ws, h), None), x, None, 3)[0],
        (LAYERS, K, K),
        (M, K),
    )
    one = 2.0 * M * K * K
    assert 3 * LAYERS * one <= cost.compiled_cost(c).flops <= 3 * LAYERS * one + 200


def test_data_dependent_loop_needs_its_trip_count():
    def fn(w, x, n):
        return jax.lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] @ w), (0, x))[1]

    args = (jax.ShapeDtypeStruct((K, K), jnp.float32), jax.ShapeDtypeStruct((M, K), jnp.float32))
    c = jax.jit(fn).lower(*args, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    one = 2.0 * M * K * K
    with pytest.raises(ValueError, match="trip count"):
        cost.compiled_cost(c)
    assert 7 * one <= cost.compiled_cost(c, data_trips=7).flops <= 7 * one + 100
    assert one <= cost.data_loop_body_cost(c).flops <= one + 10


# ----------------------------------------------------------------------------- the tiny plan


@pytest.fixture(scope="module")
def section(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    section = run_tiny("cost", out)
    assert "kept text" in out.read_text()
    return section


def rows(section: str) -> list[dict[str, str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(cost.COLUMNS)
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


def number(cell: str) -> float:
    return float(re.search(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", cell).group(0).replace(",", ""))


def test_tiny_plan_rows(section):
    steps = [r["step"].split(" (")[0] for r in rows(section)]
    assert steps == [
        "SFT step",
        "RM step",
        "PPO experience",
        "PPO update",
        "GRPO update",
        "decode step, greedy",
        "decode step, greedy",
    ]
    assert "Run with" in section and "python -m bench.cost --size tiny" in section


def test_tiny_plan_numbers_are_sane(section):
    for r in rows(section):
        flops_ratio = number(r["compiled / model"])
        # every model FLOP is compiled (a loop counted once would show as ~1 / layers); the
        # rest is recomputation and elementwise work, never more than the model's own
        assert 0.9 <= flops_ratio <= 3.0, r
        # the stated minimum is a lower bound of what any compiled program moves
        assert number(r["accessed / minimum"]) >= 1.0, r
        gflop, gb = number(r["compiled GFLOP"]), number(r["bytes accessed GB"])
        assert number(r["FLOP / byte"]) == pytest.approx(gflop / gb, rel=0.02), r
