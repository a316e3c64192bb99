#!/usr/bin/env bash
# Install vlkd and everything it needs into .venv (idempotent; a second run takes seconds).
#
#   scripts/install.sh            # torch + detectron2 (PyPI snapshot) + vlkd[test] into .venv
#   VLKD_DETECTRON2=git scripts/install.sh
#                                 # build official detectron2 from source at a pinned commit
#                                 # (needs GitHub access and a compiler; what the Dockerfile uses)
#
# Environment:
#   VLKD_VENV        venv directory (default: .venv)
#   VLKD_PYTHON      interpreter used to create it (default: python3; needs 3.10+)
#   VLKD_DETECTRON2  pypi (default) | git
#   VLKD_DETECTRON2_COMMIT  commit for VLKD_DETECTRON2=git
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
VENV="${VLKD_VENV:-.venv}"
PY="${VLKD_PYTHON:-python3}"
D2_MODE="${VLKD_DETECTRON2:-pypi}"
D2_COMMIT="${VLKD_DETECTRON2_COMMIT:-2dde706855d87baa9760fbcd0bdb6004a3937204}"
TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
D2_PYPI_PIN="sal-detectron2==0.7.2"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ninstall.sh: FAILED at step: %s\n' "$*" >&2; exit 1; }
trap 'fail "$current"' ERR

current="check python"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), f"vlkd needs Python 3.10+, found {sys.version.split()[0]}"' \
  || fail "python 3.10+ required (set VLKD_PYTHON)"

current="create venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# Quiet, but loud on failure.
pipq() { "${PIP[@]}" install -q "$@"; }

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
  pipq "$TORCH_PIN" "$TV_PIN"
fi

current="install detectron2 runtime needs"
D2_DEPS=(fvcore iopath yacs termcolor tabulate cloudpickle "omegaconf<2.4" pycocotools matplotlib pillow "setuptools<81")
if ! have fvcore iopath yacs termcolor tabulate cloudpickle omegaconf pycocotools matplotlib pillow; then
  step "installing detectron2 runtime dependencies"
  pipq "${D2_DEPS[@]}"
fi

current="install detectron2 ($D2_MODE)"
if ! "$VENV/bin/python" -c 'import detectron2.modeling, detectron2.model_zoo' 2>/dev/null; then
  if [ "$D2_MODE" = "git" ]; then
    step "building detectron2 from source at $D2_COMMIT"
    pipq --no-build-isolation "git+https://github.com/facebookresearch/detectron2.git@$D2_COMMIT"
  elif [ "$D2_MODE" = "pypi" ]; then
    # sal-detectron2 is a snapshot of detectron2's main branch whose only wheel is tagged
    # cp310. Its pure-Python parts run on any 3.10+; its compiled _C is for 3.10 and is never
    # loaded by what vlkd uses (models, ROIAlign and NMS run on torchvision's ops). So we
    # download it for 3.10, retag it py3-none-any and install it without its metadata deps
    # (which pin numpy<2, black, hydra-core that the runtime does not need).
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

current="install vlkd (editable, with test extras)"
stamp="$VENV/.vlkd-install-stamp"
sum="$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ] || ! "$VENV/bin/python" -c 'import vlkd.common' 2>/dev/null; then
  step "installing vlkd (editable) with test extras"
  pipq -e ".[test]"
  echo "$sum" > "$stamp"
fi

current="report versions"
"$VENV/bin/python" - <<'PYEOF'
import importlib, platform
mods = ["torch", "torchvision", "detectron2", "transformers", "h5py", "zarr", "numpy", "pycocoevalcap", "vlkd"]
print(f"\nvlkd environment: Python {platform.python_version()}")
for m in mods:
    try:
        mod = importlib.import_module(m)
        v = getattr(mod, "__version__", None)
        if v is None:
            from importlib.metadata import version
            v = version({"pycocoevalcap": "pycocoevalcap", "vlkd": "vlkd"}.get(m, m))
        print(f"  {m:14s} {v}")
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"install.sh: {m} does not import: {e}")
PYEOF
