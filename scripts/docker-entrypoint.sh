#!/usr/bin/env bash
# Container entrypoint: `<image> extract ARGS` -> vlkd-extract ARGS, `<image> train ARGS` ->
# vlkd-train ARGS (or torchrun when VLKD_TORCHRUN_ARGS is set), anything else is executed as is.
# The array index comes from the scheduler (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX,
# AWS_BATCH_JOB_ARRAY_INDEX); vlkd-extract reads those itself when --shard-index is not given.
#
# Caches (when VLKD_CACHE is set, as the image sets it to /tmp/vlkd-cache): every cache
# directory lives under VLKD_CACHE, which works for any UID and under Apptainer's read-only
# image. Set VLKD_CACHE to move them all, or one of the variables below to move only that one.
# Outside the image (VLKD_CACHE unset) the environment is left as it is.
set -euo pipefail

image_cache=/tmp/vlkd-cache   # the Dockerfile's VLKD_CACHE
if [ -n "${VLKD_CACHE:-}" ]; then
  for pair in HF_HOME=huggingface TORCH_HOME=torch MPLCONFIGDIR=matplotlib FVCORE_CACHE=fvcore \
              XDG_CACHE_HOME=xdg TRITON_CACHE_DIR=triton; do
    var="${pair%%=*}" sub="${pair#*=}"
    val="${!var:-}"
    # unset, or still the image's default while VLKD_CACHE points elsewhere: follow VLKD_CACHE
    if [ -z "$val" ] || [ "$val" = "$image_cache/$sub" ]; then
      val="$VLKD_CACHE/$sub"
    fi
    export "$var=$val"
    mkdir -p "$val" 2>/dev/null || echo "vlkd-entrypoint: warning: cannot create $var=$val" >&2
  done
  # An arbitrary UID (docker run --user 12345) has no home directory: give it one in the cache.
  if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ]; then
    export HOME="$VLKD_CACHE/home"
    mkdir -p "$HOME" 2>/dev/null || true
  fi
fi

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
Caches under VLKD_CACHE (default /tmp/vlkd-cache); versions: /opt/vlkd/versions.json.
USAGE
    ;;
  *) exec "$@" ;;
esac
