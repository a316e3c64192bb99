#!/usr/bin/env bash
# SLURM array job: one region-set shard per array task (phase one).
#
#   sbatch --array=0-63 scripts/cluster/slurm_extract.sh proposals
#   sbatch --array=0-63 scripts/cluster/slurm_extract.sh teacher-features
#
# Re-run only what failed: `vlkd-extract status $OUT` prints the missing/partial shards as an
# array spec, e.g. `3,7,12-15`:  sbatch --array=$(vlkd-extract status $OUT --array-spec) ...
# A re-run shard resumes after its last commit; complete shards are never rewritten.
#
# Mounts / paths (edit or export before sbatch):
#   IMAGES      image source: folder, list file, COCO JSON (+ IMAGE_ROOT) or dataset_coco.json
#   DET_CONFIG  detectron2 YAML of the detector; DET_WEIGHTS its .pth
#   PROPOSALS   (teacher-features) the student's proposals set
#   OUT         output region set (shared filesystem)
#   NUM_SHARDS  must equal the array size (and, for teacher-features, the proposals' shard count)
#   VLKD_IMAGE  container image (Apptainer/Enroot); leave empty to use vlkd from the environment
#
# Preemption and the time limit (docs/CLUSTER.md, "Preemption"):
# - `--requeue`: a task preempted or hit by a node failure goes back to the queue and resumes
#   its shard after the last committed window.
# - `--signal=B:TERM@120`: 120 s before the time limit SIGTERM goes to this batch shell (`B:`),
#   which forwards it to srun; vlkd-extract finishes and commits the window it is computing
#   and exits 143 (seconds at GPU speeds: docs/EXTRACT.md, "Preemption"), then the shell
#   requeues the task. On preemption SLURM itself sends SIGTERM to the step's processes, and
#   SIGKILL after the partition's GraceTime (ask the administrators for >= 60 s).
#SBATCH --job-name=vlkd-extract
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
set -euo pipefail
STEP="${1:?usage: slurm_extract.sh proposals|teacher-features}"
: "${IMAGES:?set IMAGES}" "${DET_CONFIG:?set DET_CONFIG}" "${DET_WEIGHTS:?set DET_WEIGHTS}" "${OUT:?set OUT}"
NUM_SHARDS="${NUM_SHARDS:-64}"
# vlkd-extract reads SLURM_ARRAY_TASK_ID itself; passing it explicitly makes the log readable.
COMMON=(--images "$IMAGES" --config "$DET_CONFIG" --weights "$DET_WEIGHTS" --out "$OUT"
        --num-shards "$NUM_SHARDS" --shard-index "${SLURM_ARRAY_TASK_ID:?not an array job}"
        --device cuda --precision fp16 --num-workers "${SLURM_CPUS_PER_TASK:-8}" --log-format json)
case "$STEP" in
  proposals)        ARGS=(proposals "${COMMON[@]}") ;;
  teacher-features) ARGS=(teacher-features --proposals "${PROPOSALS:?set PROPOSALS}" "${COMMON[@]}") ;;
  *) echo "unknown step $STEP (proposals|teacher-features)" >&2; exit 2 ;;
esac
if [ -n "${VLKD_IMAGE:-}" ]; then
  RUN=(apptainer exec --nv --bind "${BIND:-/data,/weights,/out}" "$VLKD_IMAGE" vlkd-extract)
else
  RUN=(vlkd-extract)
fi
TASK="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
stopping=0
forward_term() {
  stopping=1
  echo "SIGTERM: shard ${SLURM_ARRAY_TASK_ID} stops at its next window boundary"
  kill -TERM "$SRUN_PID" 2>/dev/null || true
}
trap forward_term TERM
srun "${RUN[@]}" "${ARGS[@]}" &
SRUN_PID=$!
# `wait` returns early when the trap runs; wait again for the window's commit and the exit.
rc=0
wait "$SRUN_PID" || rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do
  rc=0
  wait "$SRUN_PID" || rc=$?
done
if [ "$stopping" = 1 ]; then
  echo "stopped at a window boundary (exit $rc): requeueing task $TASK"
  scontrol requeue "$TASK" || true   # already requeued when it was a preemption
  exit 143
fi
exit "$rc"
