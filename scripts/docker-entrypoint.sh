#!/usr/bin/env bash
# Container entrypoint: `<image> extract ARGS` -> vlkd-extract ARGS, `<image> train ARGS` ->
# vlkd-train ARGS (or torchrun when VLKD_TORCHRUN_ARGS is set), anything else is executed as is.
# The array index comes from the scheduler (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX,
# AWS_BATCH_JOB_ARRAY_INDEX); vlkd-extract reads those itself when --shard-index is not given.
set -euo pipefail
cmd="${1:---help}"
case "$cmd" in
  extract) shift; exec vlkd-extract "$@" ;;
  train)
    shift
    if [ -n "${VLKD_TORCHRUN_ARGS:-}" ]; then
      # shellcheck disable=SC2086  # word splitting of the torchrun options is intended
      exec torchrun ${VLKD_TORCHRUN_ARGS} -m vlkd.train.cli "$@"
    fi
    exec vlkd-train "$@" ;;
  demo) shift; exec vlkd-demo "$@" ;;
  -h|--help)
    cat <<'USAGE'
vlkd container. Usage:
  extract <vlkd-extract args>   e.g. extract proposals --images /data/images --config ... --out /out/props
  train <vlkd-train args>       set VLKD_TORCHRUN_ARGS="--nnodes ... --nproc-per-node ..." for DDP
  demo [--quick]                the embedded synthetic pipeline
  <any command>                 run as is
USAGE
    ;;
  *) exec "$@" ;;
esac
