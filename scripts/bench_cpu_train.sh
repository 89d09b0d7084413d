#!/usr/bin/env bash
# Times the CPU training of the default pair (2 models, 780 steps each, the seed
# experiment's configuration) end to end: N runs (default 3), median wall time.
# Usage: scripts/bench_cpu_train.sh [runs] [extra train_pair flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-3}"
shift || true
scripts/build.sh >/dev/null
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
times=()
for i in $(seq "$runs"); do
  start=$(date +%s.%N)
  "${BUILD_DIR:-build}"/train_pair --device cpu --out "$out/run" --overwrite "$@" >"$out/stdout" 2>"$out/stderr"
  end=$(date +%s.%N)
  t=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  times+=("$t")
  echo "run $i: ${t} s ($(head -1 "$out/stdout"))"
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
echo "median wall time of ${runs} runs: ${median} s on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p'))"
