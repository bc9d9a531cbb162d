"""Run one benchmark at --size tiny in a process of its own (as `python -m bench` runs it, so
its "Run with" line is its argv) and return the section it wrote into `out`."""

import os
import re
import sys
from pathlib import Path

from processes import run

REPO = Path(__file__).resolve().parents[2]


def run_tiny(name: str, out: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # a test's fake device count must not reach the benchmark
    proc = run(
        [sys.executable, "-m", f"bench.{name}", "--size", "tiny", "--out", str(out)],
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    match = re.search(rf"<!-- bench:{name} -->\n(.*?)<!-- /bench:{name} -->", text, re.S)
    assert match, text
    return match.group(1)
