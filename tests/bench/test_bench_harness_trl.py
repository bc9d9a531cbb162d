"""The TRL comparison benchmarks run end to end at --size tiny and write their sections."""

import math
import re

import pytest

pytest.importorskip("trl")

from bench import rl_iteration, training  # noqa: E402


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- bench:{name} -->(.*?)<!-- /bench:{name} -->", text, re.S)
    assert match, f"no {name} section"
    return match.group(1)


def _table_headers(section: str) -> list[list[str]]:
    lines = section.splitlines()
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line, nxt in zip(lines, lines[1:], strict=False)
        if line.startswith("| ") and nxt.startswith("|---")
    ]


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_training_benchmark_tiny(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nkept\n")
    results = training.main(["--size", "tiny", "--out", str(out)])
    text = out.read_text()
    assert "kept" in text
    section = _section(text, "training")
    headers = _table_headers(section)
    assert len(headers) == 3
    for cols in headers:
        assert cols == list(training.COLUMNS)
    for task in ("sft", "rm", "dpo"):
        (row,) = results[task].values()
        for key in ("jax_s", "trl_s", "ratio", "jax_mfu", "trl_mfu", "jax_first", "trl_first"):
            assert _finite_positive(row[key]), (task, key, row[key])


def test_rl_iteration_benchmark_tiny(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    results = rl_iteration.main(["--size", "tiny", "--out", str(out)])
    section = _section(out.read_text(), "rl_iteration")
    headers = _table_headers(section)
    assert headers[0][:3] == ["method", "s/iteration", "samples/s"]
    assert headers[1][:2] == ["part", "s"]
    for name in ("rlhf_jax PPO", "rlhf_jax GRPO", "TRL GRPO", "TRL RLOO"):
        assert name in section
        assert _finite_positive(results["iteration"][name]["s"])
        assert _finite_positive(results["iteration"][name]["first"])
    for part in ("generation", "scoring", "experience (all)", "update"):
        assert _finite_positive(results["parts"][part])
