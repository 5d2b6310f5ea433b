#!/usr/bin/env bash
# One xr-jax command on every worker (host) of a Cloud TPU VM slice at once — how JAX runs on a pod:
# all hosts run the same program, and jax.distributed.initialize() finds the others from the TPU
# metadata. Each host reads only its own rows of the data; Orbax writes each checkpoint once (every
# host its own shards; process 0 the metadata); metrics are logged by process 0. Use gs:// (or another
# store every host sees) for checkpoint.dir and the data.
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a -- xr-jax sft --config configs/x_reasoner_sft.yaml \
#       model.path=gs://bucket/xr/base data.path=gs://bucket/OpenThoughts-114k checkpoint.dir=gs://bucket/xr/sft
#
# Environment:
#   PROJECT  gcloud project (default: gcloud's configured one)
#   WORKDIR  directory on each worker to run in (default: ~/xr_jax, a checkout of this repository)
#   SETUP    shell run on each worker first, e.g. 'git pull && pip install -e ".[tpu]"' (default: none)
# The command must accept key=value overrides at the end (xr-jax sft / grpo do): the script appends
# distributed.initialize=always so every host joins, whatever the auto-detection sees.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE -- COMMAND [ARGS...]" >&2
  exit 2
fi
TPU="$1"
ZONE="$2"
shift 2
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "$0: no command given" >&2; exit 2; }

# Quote every word for the remote shell, then add the override.
REMOTE_CMD="$(printf '%q ' "$@") distributed.initialize=always"
WORKDIR="${WORKDIR:-~/xr_jax}"
SCRIPT="set -e; cd $WORKDIR; ${SETUP:+$SETUP;} exec $REMOTE_CMD"

echo "xr-jax on TPU $TPU ($ZONE), all workers: $SCRIPT" >&2
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "$SCRIPT"
