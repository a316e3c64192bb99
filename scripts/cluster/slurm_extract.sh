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
#SBATCH --job-name=vlkd-extract
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --requeue
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
  exec srun apptainer exec --nv --bind "${BIND:-/data,/weights,/out}" "$VLKD_IMAGE" vlkd-extract "${ARGS[@]}"
else
  exec srun vlkd-extract "${ARGS[@]}"
fi
