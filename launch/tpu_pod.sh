#!/usr/bin/env bash
# Run one rlhf-jax command on every worker of an existing TPU VM (creates nothing).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- rlhf-jax pipeline --config configs/x.yaml \
#       --output gs://bucket/run mesh.fsdp=-1 mesh.data=1
#
# The code is copied to ~/rlhf_jax on each worker first, installed with the TPU extra, and the
# command runs on all workers at once; jax.distributed.initialize discovers the pod by itself.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0"; exit 2
fi
tpu=$1; zone=$2; shift 2
project_args=()
if [ "$1" != "--" ]; then project_args=(--project "$1"); shift; fi
[ "$1" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$tpu":rlhf_jax.tar.gz --zone "$zone" \
  "${project_args[@]}" --worker=all
quoted=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_args[@]}" --worker=all \
  --command "set -e; rm -rf ~/rlhf_jax && mkdir ~/rlhf_jax && tar xzf ~/rlhf_jax.tar.gz -C ~/rlhf_jax \
    && cd ~/rlhf_jax && pip install -q -e '.[tpu]' && $quoted"
