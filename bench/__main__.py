"""`python -m bench [--size tiny|full] [--out PATH]`: every benchmark, one after another.

The order puts the machine's limits first (the other tables quote them), then the compiled
cost of every step (no timing: it does not depend on the machine's load). Run it on an idle
machine: the comparisons alternate their two sides, which evens out noise between them, but a
busy machine still lowers every absolute number.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

ORDER = (
    "hardware",
    "cost",
    "generation",
    "generation_rows",
    "attention",
    "training",
    "rl_iteration",
    "scaling",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", choices=("tiny", "full"), default="full")
    p.add_argument("--out", default=None, help="markdown file to update (default BENCHMARKS.md)")
    p.add_argument("--only", nargs="*", choices=ORDER, help="a subset, in the usual order")
    args = p.parse_args(argv)
    for name in ORDER:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        print(f"== bench.{name} ==", flush=True)
        extra = ["--size", args.size] + (["--out", args.out] if args.out else [])
        # A fresh process each: no compile cache, memory or threads carried between benchmarks,
        # and each table's "run with" line is its own command.
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra])
        if code:
            print(f"bench.{name} failed with exit code {code}", file=sys.stderr)
            return code
        print(f"== bench.{name}: {time.perf_counter() - start:.0f} s ==", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
