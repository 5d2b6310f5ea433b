#!/usr/bin/env bash
# Run one xr-jax command as N local processes joined by jax.distributed (coordinator 127.0.0.1, CPU
# collectives: gloo), each with D simulated CPU devices: the multi-host code path (per-process data
# shards, global arrays, one checkpoint, process-0 logs) on one machine.
#
#   launch/local_multiprocess.sh -n 2 -d 2 -- xr-jax sft --config configs/tiny.yaml mesh.shape=[1,4,1]
#
# The command must accept `key=value` overrides at the end (xr-jax sft / grpo do): the script appends
#   distributed.initialize=always distributed.coordinator=127.0.0.1:PORT
#   distributed.num_processes=N distributed.process_id=I
# Output lines are prefixed with [pI]. If one process fails, the others are stopped and its exit code
# is returned.
set -euo pipefail

usage() { echo "usage: $0 [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- COMMAND [ARGS...]" >&2; exit 2; }

NPROC=2
DEVICES=1
PORT=""
while getopts "n:d:p:h" opt; do
  case "$opt" in
    n) NPROC="$OPTARG" ;;
    d) DEVICES="$OPTARG" ;;
    p) PORT="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || usage
[[ "$NPROC" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]] || usage

if [[ -z "$PORT" ]]; then  # a free port, chosen by the OS
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# Drop any device-count flag already set, then give each process its own D devices.
FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')
export XLA_FLAGS="$FLAGS --xla_force_host_platform_device_count=$DEVICES"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NPROC; i++)); do
  "$@" distributed.initialize=always "distributed.coordinator=127.0.0.1:$PORT" \
    "distributed.num_processes=$NPROC" "distributed.process_id=$i" \
    > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done

status=0
for ((n = 0; n < NPROC; n++)); do
  finished=""
  wait -n -p finished "${pids[@]}" || {
    status=$?
    echo "local_multiprocess: a process exited with status $status; stopping the others" >&2
    stop_all
    break
  }
  left=()
  for pid in "${pids[@]}"; do [[ "$pid" != "$finished" ]] && left+=("$pid"); done
  pids=("${left[@]}")
done
wait 2>/dev/null || true
exit "$status"
