#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan, UBSan), writes a seed corpus and fuzzes
# each reader for SECONDS (default 20) from it and from fuzz/regressions (inputs that
# once found a bug). Prints the executions of each run;
# a crash leaves its input in ${FUZZ_DIR:-build-fuzz}/crash-* and fails.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-20}"
dir="${FUZZ_DIR:-build-fuzz}"
CXX=clang++ cmake -S fuzz -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$dir" -j "$(nproc)" >/dev/null
rm -rf "$dir/seeds" && "$dir/make_seeds" "$dir/seeds"
for target in safetensors npy stats; do
  corpus="$dir/corpus/$target"
  mkdir -p "$corpus"
  log="$dir/fuzz_$target.log"
  if ! "$dir/fuzz_$target" "$corpus" "$dir/seeds/$target" fuzz/regressions -max_total_time="$seconds" -max_len=4096 \
      -artifact_prefix="$dir/" >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $target crashed; the input is in $dir/"
    exit 1
  fi
  echo "fuzz: $target: $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log" | tail -1), no crash"
done
