#!/usr/bin/env bash
# SLURM multi-node training (phase two) with torchrun: one launcher per node, N GPUs each.
#
#   sbatch --nodes=4 scripts/cluster/slurm_torchrun.sh distill --config configs/train/distill.yaml ...
#
# Everything after the script name is passed to `vlkd-train`. Resume after a preemption:
# add `--resume` (the run directory's latest checkpoint: model, optimizer, scheduler, KD queue,
# RNG and data position) and resubmit the same command.
#SBATCH --job-name=vlkd-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
srun torchrun \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
  -m vlkd.train.cli "$@"
