"""The generation, hardware and scaling benchmarks run end to end at --size tiny and write
well-formed sections (markers, header columns, positive finite numbers) into BENCHMARKS.md."""

import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tiny_run import run_tiny  # noqa: E402

from bench import generation, hardware, scaling  # noqa: E402


def tables(section: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every markdown table in a section."""
    found, lines = [], section.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("| "):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            found.append((header, rows))
    return found


def number(cell: str) -> float:
    """First number in a cell ("1,234", "2.5x", "45%", "0.12 / 0.30")."""
    m = re.search(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", cell)
    assert m, cell
    return float(m.group(0).replace(",", ""))


def assert_positive(rows: list[list[str]], header: list[str], columns: list[str]) -> None:
    for col in columns:
        j = header.index(col)
        for row in rows:
            value = number(row[j])
            assert math.isfinite(value) and value > 0, (col, row)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nkept text\n")
    return path


def test_generation_tiny(out):
    section = run_tiny("generation", out)
    (h1, rows1), (h2, rows2) = tables(section)
    assert h1 == list(generation.MAIN_COLUMNS) and h2 == list(generation.DECODE_COLUMNS)
    assert {r[2] for r in rows1} == {"greedy", "sampled"} and len(rows1) == 4
    assert_positive(rows1, h1, ["batch", "rlhf_jax tok/s", "transformers tok/s", "ratio"])
    assert_positive(rows2, h2, ["bound ms/step"])
    for row in rows2:  # per-step times are differences of medians: >= 0, finite
        for col in ("rlhf_jax ms/step", "transformers ms/step"):
            assert math.isfinite(number(row[h2.index(col)])) and number(row[h2.index(col)]) >= 0
    assert "kept text" in out.read_text()


def test_hardware_tiny(out):
    section = run_tiny("hardware", out)
    (h1, rows1), (h2, rows2) = tables(section)
    assert h1 == list(hardware.COLUMNS) and h2 == list(hardware.LIMIT_COLUMNS)
    assert_positive(rows1, h1, list(hardware.COLUMNS))
    assert [r[0] for r in rows2] == ["matmul peak", "copy bandwidth"]
    assert_positive(rows2, h2, ["value"])


def test_scaling_tiny(out):
    section = run_tiny("scaling", out)
    (h1, rows1), (h2, rows2) = tables(section)
    assert h1 == list(scaling.TIME_COLUMNS) and h2 == list(scaling.FSDP_COLUMNS)
    assert len(rows1) == len(scaling.TINY_PLAN.points)
    assert_positive(rows1, h1, [c for c in h1 if c != "model"])
    assert [int(r[1]) for r in rows2] == list(scaling.TINY_PLAN.devices)
    assert_positive(rows2, h2, [c for c in h2 if c != "model"])
    # FSDP splits weights and Adam moments: 2 devices hold half of what 1 does (the tiny
    # model's embed dimension divides evenly; norms' scales and biases are split too).
    one, two = (number(r[h2.index("params MiB/device")]) for r in rows2)
    assert two < 0.6 * one
    # every section written so far is still in the file, once each
    text = out.read_text()
    for name in ("generation", "hardware", "scaling"):
        if f"<!-- bench:{name} -->" in text:
            assert text.count(f"<!-- bench:{name} -->") == 1
