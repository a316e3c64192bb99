#!/usr/bin/env bash
# Install vlkd and everything it needs into .venv (idempotent; a second run takes seconds).
#
#   scripts/install.sh            # torch + detectron2 (PyPI snapshot) + vlkd[test] into .venv
#   VLKD_DETECTRON2=git scripts/install.sh
#                                 # build official detectron2 from source at a pinned commit
#                                 # (needs GitHub access and a compiler; the Dockerfile's option
#                                 # for compiled ops)
#   scripts/install.sh --lock     # install, then rewrite requirements.lock from the venv
#
# Every package comes in at the version requirements.lock pins (pip -c): the lock is the
# tested environment, and the Dockerfile runs this same script with the same lock, so a laptop,
# CI and the cluster image get the same versions. A venv that drifted from the lock (a package
# upgraded by hand) is put back to it. To change a version: change it here or in setup.cfg, run
# `scripts/install.sh --lock`, run the tests, commit the lock.
#
# Environment:
#   VLKD_VENV        venv directory (default: .venv)
#   VLKD_PYTHON      interpreter used to create it (default: python3; needs 3.10+)
#   VLKD_DETECTRON2  pypi (default) | git
#   VLKD_DETECTRON2_COMMIT  commit for VLKD_DETECTRON2=git
#   VLKD_EXTRAS      vlkd's extras to install (default: test; empty: none, as the image does)
#   VLKD_EDITABLE    1 (default): pip install -e; 0: a regular install (the image)
#   VLKD_DEPS_ONLY   1: everything except vlkd itself (the image's cached dependency layer)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
VENV="${VLKD_VENV:-.venv}"
PY="${VLKD_PYTHON:-python3}"
D2_MODE="${VLKD_DETECTRON2:-pypi}"
D2_COMMIT="${VLKD_DETECTRON2_COMMIT:-2dde706855d87baa9760fbcd0bdb6004a3937204}"
EXTRAS="${VLKD_EXTRAS-test}"
EDITABLE="${VLKD_EDITABLE:-1}"
DEPS_ONLY="${VLKD_DEPS_ONLY:-0}"
LOCK="$here/requirements.lock"
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
D2_PYPI_PIN="sal-detectron2==0.7.2"
# detectron2's runtime needs (its wheel is installed without its metadata's dependencies).
D2_DEPS=(fvcore iopath yacs termcolor tabulate cloudpickle "omegaconf<2.4" pycocotools matplotlib pillow "setuptools<81")

WRITE_LOCK=0
for a in "$@"; do
  case "$a" in
    --lock) WRITE_LOCK=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) printf 'install.sh: unknown argument %s (see --help)\n' "$a" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ninstall.sh: FAILED at step: %s\n' "$*" >&2; exit 1; }
trap 'fail "$current"' ERR

current="check python"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), f"vlkd needs Python 3.10+, found {sys.version.split()[0]}"' \
  || fail "python 3.10+ required (set VLKD_PYTHON)"
[ -f "$LOCK" ] || fail "requirements.lock is missing beside setup.cfg"

current="create venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# Quiet, but loud on failure; every install is held to the lock.
pipq() { "${PIP[@]}" install -q "$@"; }
pipc() { pipq -c "$LOCK" "$@"; }

have() { "$VENV/bin/python" - "$@" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if want and got.split("+")[0] != want:
        sys.exit(1)
PYEOF
}

current="install torch/torchvision"
if ! have "$TORCH_PIN" "$TV_PIN"; then
  step "installing $TORCH_PIN $TV_PIN (large; first run only)"
  pipc "$TORCH_PIN" "$TV_PIN"
fi

current="install detectron2 runtime needs"
if ! have fvcore iopath yacs termcolor tabulate cloudpickle omegaconf pycocotools matplotlib pillow; then
  step "installing detectron2 runtime dependencies"
  pipc "${D2_DEPS[@]}"
fi

current="install detectron2 ($D2_MODE)"
if ! "$VENV/bin/python" -c 'import detectron2.modeling, detectron2.model_zoo' 2>/dev/null; then
  if [ "$D2_MODE" = "git" ]; then
    # --no-deps: the runtime needs above are the same code's (its setup.py would also pull
    # hydra-core and black, and iopath<0.1.10 against the lock).
    step "building detectron2 from source at $D2_COMMIT"
    pipq --no-build-isolation --no-deps "git+https://github.com/facebookresearch/detectron2.git@$D2_COMMIT"
  elif [ "$D2_MODE" = "pypi" ]; then
    # sal-detectron2 is a snapshot of detectron2's main branch whose only wheel is tagged
    # cp310. Its pure-Python parts run on any 3.10+; its compiled _C is for 3.10 and is never
    # loaded by what vlkd uses (models, ROIAlign and NMS run on torchvision's ops). So we
    # download it for 3.10, retag it py3-none-any and install it without its metadata deps
    # (which pin numpy<2, black, hydra-core that the runtime does not need). No -c here: pip
    # cannot hold a wheel file to a version; the lock's sal-detectron2 pin is this one (a test
    # checks it).
    step "installing detectron2 from the PyPI snapshot $D2_PYPI_PIN"
    tmp="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" "$D2_PYPI_PIN"
    whl="$(ls "$tmp"/*.whl)"
    # name-version-pytag-abitag-plattag.whl -> name-version-py3-none-any.whl
    fixed="$tmp/$(basename "$whl" | sed -E 's/-[^-]+-[^-]+-[^-]+\.whl$/-py3-none-any.whl/')"
    [ "$whl" = "$fixed" ] || mv "$whl" "$fixed"
    pipq --no-deps "$fixed"
    rm -rf "$tmp"
  else
    fail "VLKD_DETECTRON2 must be 'pypi' or 'git', got '$D2_MODE'"
  fi
fi

spec="."
[ -z "$EXTRAS" ] || spec=".[$EXTRAS]"
if [ "$DEPS_ONLY" = "1" ]; then
  # vlkd's requirements (and its extras') from setup.cfg, without vlkd: a layer that only
  # changes when setup.cfg or the lock does.
  current="install vlkd's requirements"
  reqs_out="$("$VENV/bin/python" - "$EXTRAS" <<'PYEOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].splitlines()
for extra in filter(None, sys.argv[1].split(",")):
    lines += cfg["options.extras_require"][extra].splitlines()
print("\n".join(x.split("#")[0].strip() for x in lines if x.split("#")[0].strip()))
PYEOF
  )"
  mapfile -t reqs <<<"$reqs_out"
  step "installing vlkd's requirements (${#reqs[@]})"
  pipc "${reqs[@]}"
else
  current="install vlkd ($spec, editable=$EDITABLE)"
  stamp="$VENV/.vlkd-install-stamp"
  # (a changed lock needs no reinstall of vlkd: the step below re-pins what it changed)
  sum="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
  [ "$spec $EDITABLE" = ".[test] 1" ] || sum="$sum $spec editable=$EDITABLE"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ] || ! "$VENV/bin/python" -c 'import vlkd.common' 2>/dev/null; then
    if [ "$EDITABLE" = "1" ]; then
      step "installing vlkd (editable) with extras [$EXTRAS]"
      pipc -e "$spec"
    else
      step "installing vlkd${EXTRAS:+ with extras [$EXTRAS]}"
      pipc "$spec"
    fi
    echo "$sum" > "$stamp"
  fi
fi

# A venv made before the lock, or changed by hand, may hold other versions of locked packages:
# put them back (packages the lock lists but this install does not use are left alone).
current="match requirements.lock"
drift_out="$("$VENV/bin/python" - "$LOCK" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        continue
    if got.split("+")[0] != want and name != "sal-detectron2":
        print(f"{name}=={want}")
PYEOF
)"
drift=()
[ -z "$drift_out" ] || mapfile -t drift <<<"$drift_out"
if [ "${#drift[@]}" -gt 0 ]; then
  step "putting ${#drift[@]} package(s) back to requirements.lock: ${drift[*]}"
  pipc "${drift[@]}"
fi

if [ "$WRITE_LOCK" = "1" ]; then
  current="write requirements.lock"
  if [ "$D2_MODE" != "pypi" ] || [ "$DEPS_ONLY" = "1" ] || [ "$EXTRAS" != "test" ]; then
    fail "--lock needs the default install (VLKD_DETECTRON2=pypi, VLKD_EXTRAS=test)"
  fi
  step "writing requirements.lock from $VENV"
  "$VENV/bin/python" - "$LOCK" "$TORCH_PIN" "$TV_PIN" "${D2_DEPS[@]}" "$D2_PYPI_PIN" "vlkd[test]" <<'PYEOF'
# What install.sh asks for and everything those need (from the installed metadata), at the
# versions installed. Not from `pip freeze`: that would also pin whatever else was installed by
# hand into the venv.
import platform, sys
from importlib.metadata import distributions
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

out, roots = sys.argv[1], sys.argv[2:]
dists = {canonicalize_name(d.metadata["Name"]): d for d in distributions()}
seen, todo = set(), [Requirement(r) for r in roots]
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    key = (name, frozenset(req.extras))
    if key in seen:
        continue
    seen.add(key)
    if name not in dists:
        sys.exit(f"install.sh --lock: {req} is needed but not installed")
    if name == "sal-detectron2":  # installed without its metadata's dependencies
        continue
    for r in dists[name].requires or []:
        dep = Requirement(r)
        if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                     for e in ("", *req.extras)):
            todo.append(dep)
names = sorted({n for n, _ in seen} - {"vlkd"})
import torch
lines = [
    "# requirements.lock: the tested environment, as pip constraints (-c). Written by",
    "# `bash scripts/install.sh --lock` from the packages install.sh asks for and everything they",
    "# need, at the versions installed; read by scripts/install.sh (make install, CI, the Dockerfile).",
    "# Not listed: vlkd itself, pip. sal-detectron2 is installed from its retagged wheel (pinned in",
    "# install.sh; a test checks this line agrees).",
    f"# python: {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}",
    f"# platform: {platform.system().lower()} {platform.machine()}",
    f"# torch: {torch.__version__}",
    f"# cuda: {torch.version.cuda}",
]
lines += [f"{dists[n].metadata['Name']}=={dists[n].version}" for n in names]
open(out, "w").write("\n".join(lines) + "\n")
print(f"requirements.lock: {len(names)} packages")
PYEOF
fi

current="report versions"
"$VENV/bin/python" - "$DEPS_ONLY" <<'PYEOF'
import importlib, platform, sys
mods = ["torch", "torchvision", "detectron2", "transformers", "h5py", "zarr", "numpy", "pycocoevalcap"]
if sys.argv[1] != "1":
    mods.append("vlkd")
print(f"\nvlkd environment: Python {platform.python_version()}")
for m in mods:
    try:
        mod = importlib.import_module(m)
        v = getattr(mod, "__version__", None)
        if v is None:
            from importlib.metadata import version
            v = version(m)
        print(f"  {m:14s} {v}")
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"install.sh: {m} does not import: {e}")
PYEOF
