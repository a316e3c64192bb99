#!/usr/bin/env bash
# SLURM multi-node training (phase two) with torchrun: one launcher per node, N GPUs each.
#
#   sbatch --nodes=4 scripts/cluster/slurm_torchrun.sh distill --config configs/train/distill.yaml ...
#
# Everything after the script name is passed to `vlkd-train`, followed by `--resume auto`: the
# run directory's latest checkpoint when it has one (model, optimizer, scheduler, KD queue, RNG,
# data position), else step 0. So the same command starts the run and continues it, and a
# requeued job picks up where the last one stopped.
#
# Preemption and the time limit (docs/CLUSTER.md, "Preemption"):
# - `--requeue`: a job preempted by a higher-priority one, or hit by a node failure, goes back
#   to the queue with the same job id and runs this script again.
# - `--signal=B:TERM@120`: 120 s before the time limit (SLURM may send it up to 60 s earlier)
#   SIGTERM goes to this batch shell only (`B:`); without `B:` it would go to every process of
#   the job steps instead and never to this shell, which then could not requeue the job. The
#   trap below forwards it to srun, which forwards it to every node's torchrun, which forwards
#   it to its ranks. On preemption SLURM sends SIGTERM itself, to the steps' processes, and
#   SIGKILL after the partition's GraceTime (set by the administrators: ask for ≥ 60 s).
# - Every rank stops at the same optimizer step (one all-reduce per step agrees on the signal),
#   writes the checkpoint and exits 143, within seconds (docs/TRAIN.md, "Resuming, stopping");
#   DataLoader workers ignore the signal until the trainer shuts them down.
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT is how long torchrun waits for its ranks before SIGKILL.
# - Stopped before its end by the time-limit signal, the job requeues itself; preempted, SLURM
#   requeues it.
#SBATCH --job-name=vlkd-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
set -euo pipefail
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}"
echo "job $SLURM_JOB_ID, start ${SLURM_RESTART_COUNT:-0} (requeues so far)"

stopping=0
forward_term() {
  stopping=1
  echo "SIGTERM: every rank stops at its next optimizer step and writes a checkpoint"
  kill -TERM "$SRUN_PID" 2>/dev/null || true
}
trap forward_term TERM

srun torchrun \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
  -m vlkd.train.cli "$@" --resume auto &
SRUN_PID=$!
# `wait` returns early when the trap runs; wait again for the ranks' checkpoint and exit.
rc=0
wait "$SRUN_PID" || rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do
  rc=0
  wait "$SRUN_PID" || rc=$?
done
if [ "$stopping" = 1 ]; then
  echo "stopped with a checkpoint (srun exit $rc): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || true   # already requeued when it was a preemption
  exit 143
fi
exit "$rc"
