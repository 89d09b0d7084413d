#!/usr/bin/env bash
# Everything a GPU machine should run, in one go: builds for sm_90, runs the whole
# suite (GPU tests included), compute-sanitizer memcheck and racecheck over the GPU
# tests, the PyTorch comparison where torch is installed, and bench_kernels.
# Logs and bench.json go to ${OUT:-gpu-results}; a summary table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-gpu-results}"
mkdir -p "$out"
export PATH="/usr/local/cuda/bin:$PATH"
summary=()
step() {  # step NAME COMMAND...: runs, logs, records pass/fail
  local name="$1"
  shift
  if "$@" >"$out/$name.log" 2>&1; then summary+=("PASS $name"); else summary+=("FAIL $name (see $out/$name.log)"); fi
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
step build env BUILD_DIR=build-gpu scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90
step ctest ctest --test-dir build-gpu --output-on-failure -j 4
step gpu_tests build-gpu/tests/univ_tests --gtest_filter='Gpu*'
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 build-gpu/tests/univ_tests --gtest_filter='Gpu*'
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 build-gpu/tests/univ_tests \
  --gtest_filter='Gpu.Embedding:Gpu.LayerNorm:Gpu.BiasEpilogues:Gpu.Attention:Gpu.CrossEntropy:Gpu.NormsClippingAndAdamW'
step torch sh -c "build-gpu/train_pair --out $out/torch_run --overwrite --steps 20 --samples 640 --device cpu && \
  python3 tests/torch/check_torch.py $out/torch_run build-gpu/tests/dump_step"
step bench sh -c "build-gpu/bench_kernels --json > $out/bench.json"
build-gpu/bench_kernels > "$out/bench.txt" 2>&1
printf '%s\n' "${summary[@]}"
cat "$out/bench.txt"
