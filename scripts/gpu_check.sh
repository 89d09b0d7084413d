#!/usr/bin/env bash
# Everything a GPU machine should run, in one go: the GPU tests, bench_kernels (and a
# baseline build's, where the pack has one), the kernels of queued training steps on a
# timeline (bench_kernels --timeline, in log.txt), the default pair's training time, the
# PyTorch comparison, the seed experiment's correlation step on GPU and CPU, then side
# by side the whole CTest suite, compute-sanitizer memcheck (GPU tests) and racecheck
# (the training ops' and the Haar QR's tests), and last Nsight Compute: the detailed
# report of the kernels whose time is least explained (scripts/kernel_report.sh) and a
# per-kernel profile of training steps. Each step has a time limit and a log;
# ${OUT:-gpu-results} receives machine.txt, log.txt (every step's output), summary.txt
# (one line per step, also printed last), bench.json, bench.txt (each fused kernel
# beside its kernels apart, and the baseline's times beside these; also printed last),
# baseline.json, kernels.txt and profile.txt.
#
#   scripts/gpu_check.sh              build for sm_90 here, then check
#   scripts/gpu_check.sh --prebuilt   use build-gpu-dist from scripts/pack_gpu_build.sh
#                                     (for GPU hosts without the development packages)
# GPU_CHECK_STEPS="ctest bench ..." runs only the steps named; GPU_CHECK_MEMCHECK_FILTER
# narrows memcheck (a gtest filter, default Gpu*); GPU_CHECK_SECONDS bounds the whole
# check: each step's limit shrinks to the time left, and steps with less than 20 s left
# are skipped (SKIPPED in the summary), in the order above, the most telling first.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export PATH="/usr/local/cuda/bin:$PATH"

out="${OUT:-gpu-results}"
logs="$(mktemp -d)"  # run directories of the steps; only logs and summaries go to $out
mkdir -p "$out"
: >"$out/summary.txt"
: >"$out/log.txt"
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-1000000}))
step() {  # step NAME SECONDS COMMAND...: runs under a time limit, logs, records the outcome
  local name="$1" limit="$2" start=$SECONDS rc verdict=PASS
  shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then return 0; fi
  [ $((deadline - SECONDS)) -lt "$limit" ] && limit=$((deadline - SECONDS))
  if [ "$limit" -lt 20 ]; then
    : >"$logs/$name.log"
    verdict=SKIPPED
  else
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ]; then verdict=TIMEOUT; elif [ $rc -ne 0 ]; then verdict="FAIL($rc)"; fi
  fi
  # Steps may run side by side: each appends its log and line under a lock.
  flock "$logs/lock" bash -c 'printf "\n===== %s: %s\n" "$1" "$2" >>"$3/log.txt"; cat "$4" >>"$3/log.txt"
    printf "%-10s %-12s %4ds\n" "$2" "$1" "$5" | tee -a "$3/summary.txt"' \
    _ "$name" "$verdict" "$out" "$logs/$name.log" $((SECONDS - start))
}

if [ "${1:-}" = "--prebuilt" ]; then
  # The build's CTest files hold the absolute paths of the machine that built it: make
  # them valid here (source tree, Python, CMake) and find the staged libraries.
  [ -d build-gpu-dist ] || { echo "build-gpu-dist missing: run scripts/pack_gpu_build.sh first" >&2; exit 2; }
  [ -e build-gpu ] || ln -s build-gpu-dist build-gpu
  cache_value() { grep -m1 "^$1:" build-gpu/CMakeCache.txt | cut -d= -f2-; }
  link_if_missing() {  # link_if_missing PATH TARGET
    if [ -n "$1" ] && [ ! -e "$1" ]; then mkdir -p "$(dirname "$1")" && ln -s "$2" "$1"; fi
  }
  link_if_missing "$(cache_value CMAKE_HOME_DIRECTORY)" "$root"
  python="$(cache_value _Python3_EXECUTABLE)"  # a wrapper, not a link: a venv's python finds its packages
  if [ -n "$python" ] && [ ! -e "$python" ]; then
    mkdir -p "$(dirname "$python")" && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$python"
    chmod +x "$python"
  fi
  link_if_missing "$(cache_value CMAKE_COMMAND)" "$(command -v cmake)"
  export LD_LIBRARY_PATH="$root/build-gpu-dist/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
else
  step build 900 env BUILD_DIR=build-gpu scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90
fi
bin="$root/build-gpu"

{ nvidia-smi; nvcc --version; python3 -c 'import torch; print("torch", torch.__version__)'
  ldd "$bin/correlate" | grep "not found" && echo "shared libraries missing: the programs cannot start"; } >"$out/machine.txt" 2>&1
step gpu_tests 120 "$bin/tests/univ_tests" --gtest_filter='Gpu*'
step bench 240 "$bin/bench_kernels" --json "$out/bench.json"
[ -s "$out/bench.json" ] && python3 scripts/bench_pairs.py "$out/bench.json" >"$out/bench.txt" 2>&1
# The baseline right after, on the same card (kernel rows and steps, the current
# build's time over the baseline's).
if [ -x "$bin/baseline/bench_kernels" ]; then
  step baseline 240 "$bin/baseline/bench_kernels" --json "$out/baseline.json"
  [ -s "$out/baseline.json" ] && [ -s "$out/bench.json" ] &&
    { echo; echo "== against the baseline, $(cat "$bin/baseline/revision")"
      python3 scripts/bench_compare.py "$out/baseline.json" "$out/bench.json"; } >>"$out/bench.txt" 2>&1
fi
# Every kernel of queued steps (CUPTI): the chain that bounds a step, and its gaps.
step timeline 90 "$bin/bench_kernels" --timeline
step train_cuda 45 bash -c "for i in 1 2 3; do time '$bin/train_pair' --device cuda --out '$logs/pair_cuda' --overwrite; done"
step torch 45 sh -c "'$bin/train_pair' --out '$logs/torch_run' --overwrite --steps 20 --samples 640 --device cuda && \
  python3 tests/torch/check_torch.py '$logs/torch_run' '$bin/tests/dump_step' && \
  python3 tests/torch/check_torch.py '$logs/torch_run' '$bin/tests/dump_step' --device cuda --backend cuda"
# The seed experiment's correlation step on the GPU (three runs) and on the CPU.
step correlate 90 bash -c "for i in 1 2 3; do '$bin/correlate' '$logs/pair_cuda' --device cuda --out '$logs/corr_gpu' || exit 1; \
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(\"gpu timings\", s[\"timings_seconds\"])' '$logs/corr_gpu/summary.json'; done && \
  '$bin/correlate' '$logs/pair_cuda' --device cpu --out '$logs/corr_cpu' && \
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(\"cpu timings\", s[\"timings_seconds\"])' '$logs/corr_cpu/summary.json' && \
  python3 -c 'import json,sys; print([(f, json.load(open(f))[\"universal\"]) for f in sys.argv[1:]])' \
    '$logs/corr_gpu/summary.json' '$logs/corr_cpu/summary.json'"
# The whole suite and the sanitizers side by side (their results, not their times, count).
step ctest 150 ctest --test-dir "$bin" --output-on-failure -j 8 &
step racecheck 360 compute-sanitizer --tool racecheck --error-exitcode 1 "$bin/tests/univ_tests" \
  --gtest_filter='Gpu.Embedding:Gpu.LayerNorm:Gpu.BiasActivationEpilogue:Gpu.MatmulActivationEpilogues:Gpu.MatmulRowEpilogues:Gpu.MlpSublayer*:Gpu.ColumnSums*:Gpu.Attention*:Gpu.FusedBlock*:Gpu.CrossEntropy:Gpu.NormsClippingAndAdamW:GpuRotation.SmallHaarMatricesEqualTheHostDraws' &
step memcheck 210 compute-sanitizer --tool memcheck --error-exitcode 1 "$bin/tests/univ_tests" \
  --gtest_filter="${GPU_CHECK_MEMCHECK_FILTER:-Gpu*}"
wait
step kernels 150 env OUT="$out" scripts/kernel_report.sh
# Where a training step's GPU time goes, kernel by kernel (Nsight Compute, clocks not
# locked): three steps of the default pair and two of the large configuration; then
# the seed correlation step (forward, statistics, rotation baseline) on the first run.
profile() {  # profile NAME PROGRAM ARGS...
  local name="$1"
  shift
  ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-kernel-base function "$@" \
    >"$logs/ncu_$name.csv" &&
    { echo "== $name"; python3 scripts/ncu_summary.py "$logs/ncu_$name.csv"; } >>"$out/profile.txt"
}
train_flags="--device cuda --overwrite --test-samples 64"
step profile 200 bash -c "$(declare -f profile); bin='$bin' logs='$logs' out='$out'; : >'$out/profile.txt'; \
  profile seed '$bin/train_pair' $train_flags --out '$logs/profile_seed' --steps 3 --samples 256 && \
  profile large '$bin/train_pair' $train_flags --out '$logs/profile_large' --steps 2 --samples 128 --vocab 256 \
    --seq-len 128 --d-model 256 --heads 8 --d-mlp 1024 --layers 4 --models 1 && \
  profile correlate '$bin/correlate' '$logs/profile_seed' --device cuda --out '$logs/profile_correlate' && \
  cat '$out/profile.txt'"
rm -rf "$logs"
head -20 "$out/machine.txt"
cat "$out/bench.txt" 2>/dev/null
cat "$out/summary.txt"
