#!/usr/bin/env bash
# One xr-jax command on a SLURM GPU allocation: every task runs the same program and
# jax.distributed.initialize() finds the others from SLURM's environment (coordinator = first node of
# the step, port from the job id, process id = SLURM_PROCID, process count = SLURM_NTASKS).
#
#   sbatch --nodes=4 launch/slurm_gpu.sh xr-jax sft --config configs/x_reasoner_sft.yaml \
#       model.path=/shared/Qwen2.5-VL-7B-Instruct data.path=/shared/OpenThoughts-114k checkpoint.dir=/shared/xr/sft
#
# Layouts (pick with --ntasks-per-node on the sbatch line):
#   one process per GPU  (default below, 8 tasks per node): JAX gives task i GPU SLURM_LOCALID.
#   one process per node (--ntasks-per-node=1): the task sees every GPU of its node.
# Either way each process reads only its own rows of the data (xr_jax.data shards by process), Orbax
# writes each checkpoint once (every process its own shards; process 0 the metadata), and metrics are
# logged by process 0. checkpoint.dir, logging.dir and the data must be on storage all nodes see.
# Check first that the run fits: xr-jax plan --config ... --devices $((NODES * 8)) --device-kind a100-40gb
# Preemption: a run stopped by SIGTERM saves its checkpoint and exits 75; this script then requeues the job
# (`scontrol requeue`; needs `sbatch --requeue`, off with XR_JAX_REQUEUE=0) and the requeued job resumes.
#
#SBATCH --job-name=xr-jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --output=xr-jax-%j.out
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: sbatch [--nodes N] [--ntasks-per-node 8|1] launch/slurm_gpu.sh COMMAND [ARGS...]" >&2
  exit 2
fi

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "$0: not inside a SLURM job; submit it with sbatch (or run it under salloc)" >&2
  exit 2
fi

# JAX preallocates 75% of GPU memory by default; `xr-jax plan` budgets 90% (--usable-fraction).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

# Per task, before Python starts: which local GPUs this process drives (JAX_LOCAL_DEVICE_IDS, read by
# jax.distributed.initialize). JAX's SLURM default is [SLURM_LOCALID], right for one task per GPU with
# every GPU visible; two cases need help:
#   one task per node        -> all GPUs of the node (else JAX would use GPU 0 only);
#   SLURM bound one GPU/task -> CUDA_VISIBLE_DEVICES holds one GPU, which JAX sees as device 0.
TASK_SETUP='
tasks_per_node=$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))
if [[ $tasks_per_node -eq 1 ]]; then
  gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $(( gpus - 1 )))
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != *,* ]]; then
  export JAX_LOCAL_DEVICE_IDS=0
fi
exec "$@"'

echo "xr-jax on SLURM job $SLURM_JOB_ID: $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES node(s): $*" >&2
# Preemption / time limit: SLURM sends TERM to the tasks (xr-jax saves a checkpoint after the current step
# and exits 75) and to this script, which must outlive srun to requeue: the trap only notes the signal.
trap 'echo "$0: SIGTERM: waiting for xr-jax to save its checkpoint" >&2' TERM
set +e
srun --label --kill-on-bad-exit=1 bash -c "$TASK_SETUP" xr-jax-task "$@" &
srun_pid=$!
while true; do  # `wait` returns early when a trapped signal arrives: wait again until srun has ended
  wait "$srun_pid"
  rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
set -e
# 75 (EX_TEMPFAIL): stopped by a signal with its checkpoint saved; the same command resumes it.
if [[ $rc -eq 75 && "${XR_JAX_REQUEUE:-1}" == 1 ]]; then
  echo "$0: stopped with a checkpoint saved (exit 75): requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
