#!/usr/bin/env bash
# Container smoke test, for machines with Docker: build the image, then run the quick demo's
# extraction (synthetic data, both detectors, student proposals, teacher features over the
# student's boxes, the teacher's own proposals, validate) and one training step inside it, as
# an arbitrary UID on a read-only root filesystem (how Apptainer/Singularity runs an image).
# With GPUs it also runs the student proposals on CUDA. With apptainer on PATH it also
# converts the image to a SIF and runs one command in it.
#
#   scripts/docker-smoke.sh                          # build vlkd:smoke, run everything
#   SMOKE_BUILD=0 SMOKE_IMAGE=vlkd:0.1.0 scripts/docker-smoke.sh   # an image already built
#   SMOKE_BUILD_ARGS="--build-arg DETECTRON2=git" scripts/docker-smoke.sh
#
# Environment:
#   SMOKE_IMAGE       image tag (default vlkd:smoke)
#   SMOKE_BUILD       1 (default): docker build first; 0: use SMOKE_IMAGE as it is
#   SMOKE_BUILD_ARGS  extra `docker build` arguments (word-split)
#   SMOKE_GPUS        auto (default: all GPUs when nvidia-smi works here) | all | none
#   SMOKE_UID         the arbitrary UID:GID the container runs as (default 12345:12345)
#   SMOKE_APPTAINER   auto (default: when apptainer is on PATH) | 1 | 0
#   SMOKE_KEEP        1: keep the work folder (printed at the end)
# Takes ~5-10 min after the build on a laptop CPU (the detectors train for the quick demo's
# iterations); the first build downloads ~6 GB.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
DOCKER="${DOCKER:-docker}"
IMAGE="${SMOKE_IMAGE:-vlkd:smoke}"
BUILD="${SMOKE_BUILD:-1}"
GPUS="${SMOKE_GPUS:-auto}"
UIDGID="${SMOKE_UID:-12345:12345}"
APPTAINER="${SMOKE_APPTAINER:-auto}"

say() { printf '\n==> docker-smoke: %s\n' "$*"; }
fail() { printf '\ndocker-smoke: FAILED: %s\n' "$*" >&2; exit 1; }

"$DOCKER" info >/dev/null 2>&1 || fail "no Docker daemon answers ('$DOCKER info'); run this where Docker works"

work="$(mktemp -d "${TMPDIR:-/tmp}/vlkd-smoke.XXXXXX")"
cleanup() { if [ "${SMOKE_KEEP:-0}" = "1" ]; then echo "work folder kept: $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
chmod 0777 "$work"     # the container's arbitrary UID writes here

if [ "$BUILD" = "1" ]; then
  rev="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if [ "$rev" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then rev="$rev-dirty"; fi
  say "building $IMAGE (revision $rev)"
  # shellcheck disable=SC2086  # SMOKE_BUILD_ARGS is a list of arguments
  "$DOCKER" build -t "$IMAGE" \
    --build-arg VCS_REF="$rev" \
    --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --build-arg SOURCE_URL="$(git remote get-url origin 2>/dev/null || echo unknown)" \
    ${SMOKE_BUILD_ARGS:-} .
  got="$("$DOCKER" image inspect --format '{{ index .Config.Labels "org.opencontainers.image.revision" }}' "$IMAGE")"
  [ "$got" = "$rev" ] || fail "label org.opencontainers.image.revision is '$got', expected '$rev'"
fi

say "labels and installed versions"
# shellcheck disable=SC2016  # a Go template, not shell
"$DOCKER" image inspect --format '{{ range $k, $v := .Config.Labels }}{{ $k }}={{ $v }}{{ "\n" }}{{ end }}' "$IMAGE"
versions="$("$DOCKER" run --rm "$IMAGE" cat /opt/vlkd/versions.json)"
echo "$versions"
torch_label="$("$DOCKER" image inspect --format '{{ index .Config.Labels "vlkd.torch" }}' "$IMAGE")"
case "$versions" in
  *"\"torch\": \"$torch_label"*) ;;
  *) fail "label vlkd.torch=$torch_label, but the image holds $versions" ;;
esac
"$DOCKER" run --rm "$IMAGE" --help | grep -q "extract <vlkd-extract args>" || fail "entrypoint --help"

gpu_args=()
if [ "$GPUS" = "all" ] || { [ "$GPUS" = "auto" ] && nvidia-smi -L >/dev/null 2>&1; }; then
  gpu_args=(--gpus all)
fi

say "quick demo extraction + one training step as UID $UIDGID on a read-only root ${gpu_args[*]:-(CPU)}"
# --read-only + a tmpfs /tmp is what Apptainer gives a job: nothing writable but /tmp and binds.
"$DOCKER" run --rm -i --read-only --tmpfs /tmp:rw,exec,mode=1777 --user "$UIDGID" \
  "${gpu_args[@]}" -v "$work:/out" "$IMAGE" python - <<'PYEOF'
import os, subprocess, sys, time
from pathlib import Path

# The caches the entrypoint set up: all under VLKD_CACHE and writable by this arbitrary UID.
print(f"uid {os.getuid()}, gid {os.getgid()}, HOME {os.environ['HOME']}", flush=True)
for var in ("HF_HOME", "TORCH_HOME", "MPLCONFIGDIR", "FVCORE_CACHE", "XDG_CACHE_HOME",
            "TRITON_CACHE_DIR", "HOME"):
    path = os.environ.get(var, "")
    assert path.startswith(os.environ["VLKD_CACHE"]), f"{var}={path!r} is not under VLKD_CACHE"
    assert os.access(path, os.W_OK), f"{var}={path} is not writable for uid {os.getuid()}"
root = [line.split() for line in open("/proc/mounts") if line.split()[1] == "/"]
assert root and "ro" in root[-1][3].split(","), f"the root filesystem is not read-only: {root}"

from vlkd.demo.pipeline import Demo

demo = Demo(Path("/out/demo"), quick=True)
demo.plan()
stages = {st.name: st for st in demo.log}
# the quick demo's extraction, then its first training stage (run for one step)
order = ["data", "detector-student", "detector-teacher", "proposals-student",
         "teacher-features", "proposals-teacher", "validate", "tokenizer",
         "caption: student without KD"]
train = order[-1]


def run(name, argv, out):
    out.mkdir(parents=True, exist_ok=True)
    log = out / "smoke.log"
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.stdout.write(log.read_text()[-4000:])
        sys.exit(f"docker-smoke: stage {name!r} exited {rc} (log above; command: {argv})")
    print(f"  ok  {name:32s} {time.time() - t0:6.1f} s", flush=True)


for name in order:
    argv = list(stages[name].argv)
    if name == train:  # one optimizer step
        argv[argv.index("--max-steps") + 1] = "1"
    run(name, argv, stages[name].out)
final = Demo.model_dir(stages[train].out)
assert final.is_dir(), f"the training step left no model at {final}"

import torch
if torch.cuda.is_available():
    argv = list(stages["proposals-student"].argv)
    argv[argv.index("--out") + 1] = "/out/demo/regions/student-cuda"
    run(f"proposals-student on {torch.cuda.get_device_name(0)}", argv + ["--device", "cuda"],
        Path("/out/demo/regions/student-cuda"))
print("docker-smoke: container checks passed")
PYEOF

if [ "$APPTAINER" = "1" ] || { [ "$APPTAINER" = "auto" ] && command -v apptainer >/dev/null; }; then
  say "Apptainer: SIF from the Docker daemon, one command in it"
  apptainer build "$work/vlkd.sif" "docker-daemon://$IMAGE"
  apptainer exec --containall --bind "$work:/out" "$work/vlkd.sif" \
    vlkd-entrypoint extract validate /out/demo/regions/teacher-vta --against /out/demo/regions/student
fi

say "passed ($IMAGE)"
