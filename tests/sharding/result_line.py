"""The `RESULT {json}` line a subprocess script reports to its test with, written with one
`write(2)` so that nothing else writing to the same pipe can split it: gloo's C++ logging
("[Gloo] Rank 0 is connected to ...") once landed between `print`'s "RESULT" and its JSON,
and the test found no result line (CI, 2026-12-04)."""

import json
import os
import sys


def emit(result: dict) -> None:
    sys.stdout.flush()  # what the script printed before goes first
    os.write(sys.stdout.fileno(), f"RESULT {json.dumps(result)}\n".encode())
