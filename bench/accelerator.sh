#!/usr/bin/env bash
# The accelerator check (bench/accelerator.py): one markdown table of rlhf_jax on one GPU
# against transformers and the board's peak, in a few minutes, nothing downloaded.
#   bash bench/accelerator.sh [--size full|tiny] [--out DIR] [--budget SECONDS]
# Runs the project from this working tree; $PYTHON picks the interpreter.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
export RLHF_JAX_ACCELERATOR_SH=1  # so the table's header names this command
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m bench.accelerator "$@"
