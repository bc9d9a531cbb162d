#!/usr/bin/env bash
# Run one rlhf-jax command on one local GPU.
#
#   pip install -e '.[cuda12]'    # or '.[cuda13]': the machine's CUDA major version
#   launch/single_gpu.sh [GPU_INDEX] -- rlhf-jax pipeline --config configs/quickstart.yaml --output out/gpu
#
# JAX preallocates 75% of GPU memory by default; policy, reference, reward and value models
# share one device here, so let it grow on demand instead and keep the rest for generation.
set -euo pipefail
gpu=0
if [ $# -gt 0 ] && [ "$1" != "--" ]; then gpu=$1; shift; fi
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then sed -n '2,5p' "$0"; exit 2; fi
export CUDA_VISIBLE_DEVICES=$gpu
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec "$@"
