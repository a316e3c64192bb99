#!/usr/bin/env bash
# The demo's timing claims (README "The demo", docs/DEMO.md "Budget and measured time"),
# measured as a new user meets them: a fresh clone of this checkout, nothing else running.
#
#   bash scripts/time_demo.sh [--kd-gain] [--keep DIR]
#
# Clones the repository's HEAD into a temporary folder, then times there, one after another:
# `make install` (a fresh venv), `make demo`, `vlkd-demo --quick` (its own --out) and, with
# --kd-gain, `python benchmarks/kd_gain.py --out demo-out` (3 seeds, reusing the demo). It
# prints the machine (cores, CPU model, memory, load before starting) and, at the end, the
# lines to paste into README.md and docs/DEMO.md, with wall and CPU (user) time of each step.
# The clone's demo-out/report.md and kd_gain.md are printed too (their tables go in
# docs/DEMO.md "What the full demo shows" and benchmarks/README.md#kd_gain).
# Nothing else should run on the machine meanwhile: the script refuses to start when the
# 1-minute load average is above 0.5 (override: VLKD_TIME_ANYWAY=1).
set -euo pipefail

KD_GAIN=0
KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kd-gain) KD_GAIN=1 ;;
    --keep) KEEP="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "time_demo.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
load="$(cut -d' ' -f1 /proc/loadavg)"
if [ "${VLKD_TIME_ANYWAY:-0}" != 1 ] && awk -v l="$load" 'BEGIN{exit !(l > 0.5)}'; then
  echo "time_demo.sh: the load average is $load; these timings need a quiet machine" \
       "(VLKD_TIME_ANYWAY=1 to measure anyway, and say so next to the numbers)" >&2
  exit 1
fi
work="${KEEP:-$(mktemp -d)}"
mkdir -p "$work"
git clone --quiet "$repo" "$work/vlkd"
cd "$work/vlkd"
commit="$(git rev-parse --short HEAD)"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
cores="$(nproc)"
mem="$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
echo "machine: $cores cores, $cpu, $mem; load average before: $load; commit $commit"

declare -A WALL USER
step() {  # step NAME COMMAND...: runs it, records wall and user seconds
  local name="$1"; shift
  local t="$work/time-$name.txt"
  echo "== $name: $*"
  /usr/bin/env time -f "%e %U" -o "$t" "$@"
  read -r "WALL[$name]" "USER[$name]" < "$t"
}
fmt() { awk -v s="$1" 'BEGIN{printf "%d min %02d s", s / 60, s % 60}'; }

step install make install
step demo .venv/bin/vlkd-demo --out demo-out
step quick .venv/bin/vlkd-demo --out demo-quick --quick
if [ "$KD_GAIN" = 1 ]; then
  step kd_gain .venv/bin/python benchmarks/kd_gain.py --out demo-out
fi

echo
echo "== demo-out/report.md"
cat demo-out/report.md
if [ -f demo-out/kd_gain.md ]; then echo "== demo-out/kd_gain.md"; cat demo-out/kd_gain.md; fi
echo
echo "== paste into docs/DEMO.md, 'Budget and measured time' (and the README's demo section):"
echo "Measured on a fresh clone (commit $commit) of $cores cores, $cpu, $mem, with nothing else"
echo "running (load average $load before the first step):"
echo
echo "| step | wall time | CPU time (user) |"
echo "|---|---|---|"
for name in install demo quick kd_gain; do
  [ -n "${WALL[$name]:-}" ] || continue
  echo "| $name | $(fmt "${WALL[$name]}") | $(fmt "${USER[$name]}") |"
done
echo
echo "(files kept in $work)"
