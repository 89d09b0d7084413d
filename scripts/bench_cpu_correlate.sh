#!/usr/bin/env bash
# Times the seed experiment's correlation step on the CPU: the default pair (trained
# once, 2 models x 780 steps), then N correlate runs (default 3) over the 32,000
# held-out tokens with 8 + 8 rotation draws; the median of each phase that
# summary.json records. Usage: scripts/bench_cpu_correlate.sh [runs] [extra correlate flags...]
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-3}"
shift || true
scripts/build.sh >/dev/null
bin="${BUILD_DIR:-build}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$bin"/train_pair --device cpu --out "$out/pair" >/dev/null 2>&1
for i in $(seq "$runs"); do
  "$bin"/correlate "$out/pair" --device cpu --out "$out/report" "$@" >/dev/null 2>"$out/stderr"
  cp "$out/report/summary.json" "$out/summary_$i.json"
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
timings = [json.load(open(f"{out}/summary_{i}.json"))["timings_seconds"] for i in range(1, runs + 1)]
for phase in timings[0]:
    values = [t[phase] for t in timings]
    print(f"{phase}: median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})")
PY
echo "on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p'))"
