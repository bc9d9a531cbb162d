#!/usr/bin/env bash
# Run one rlhf-jax command on every worker of an existing TPU VM (creates nothing).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- rlhf-jax pipeline --config configs/x.yaml \
#       --output gs://bucket/run mesh.fsdp=-1 mesh.data=1
#
# The code is copied to ~/rlhf_jax on each worker first and installed with the TPU extra at
# the versions the tests passed with (launch/constraints.txt); the command runs on all workers
# at once; jax.distributed.initialize discovers the pod by itself. With RETRIES=N (default 0),
# a launch that a preemption ends (any exit but 0 and 2, the code of a bad input) waits for the
# TPU to be READY again and runs again, up to N times: the run resumes from its checkpoints at
# --output, which must then be a gs:// URL (a worker's disk does not survive a preemption).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
tpu=$1; zone=$2; shift 2
project_args=()
if [ "$1" != "--" ]; then project_args=(--project "$1"); shift; fi
[ "$1" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
retries=${RETRIES:-0}
quoted=$(printf '%q ' "$@")

launch() {
  local archive
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$tpu":rlhf_jax.tar.gz --zone "$zone" \
    "${project_args[@]}" --worker=all
  rm -f "$archive"
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_args[@]}" --worker=all \
    --command "set -e; rm -rf ~/rlhf_jax && mkdir ~/rlhf_jax && tar xzf ~/rlhf_jax.tar.gz -C ~/rlhf_jax \
      && cd ~/rlhf_jax && pip install -q -c launch/constraints.txt -e '.[tpu]' && $quoted"
}

wait_ready() {
  until [ "$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" "${project_args[@]}" \
      --format='value(state)')" = READY ]; do
    echo "tpu_pod.sh: waiting for $tpu to be READY" >&2; sleep 60
  done
}

attempt=0
while true; do
  status=0; launch || status=$?
  if [ "$status" -eq 0 ] || [ "$status" -eq 2 ] || [ "$attempt" -ge "$retries" ]; then
    exit "$status"
  fi
  attempt=$((attempt + 1))
  echo "tpu_pod.sh: the launch ended with status $status (preempted?); again ($attempt of $retries)" >&2
  wait_ready
done
