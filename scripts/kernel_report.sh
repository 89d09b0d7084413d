#!/usr/bin/env bash
# Nsight Compute's detailed report (throughput, occupancy, warp stalls, scheduler,
# memory tables, shared-memory bank conflicts) for the training kernels whose time is
# least explained, one launch each: the seed step's chain (the MLP kernel each way, 4 x
# 35.6 us of a 360 us step on an H100, in float32 and with its products on the tensor
# cores, and the attention each way), and the attention kernels of the large
# configuration; the attention flash attention's way, in float32 and at the large
# configuration on the tensor cores under --precision tf32 (whose backward forms the
# probabilities again: its third template argument). Writes
# ${OUT:-gpu-results}/kernels.txt. Uses build-gpu (scripts/gpu_check.sh's build) or,
# unpacked from scripts/pack_gpu_build.sh's archive, build-gpu-dist.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
bin="$PWD/build-gpu"
if [ ! -x "$bin/train_pair" ] && [ -d build-gpu-dist ]; then
  bin="$PWD/build-gpu-dist"
  export LD_LIBRARY_PATH="$bin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
fi
out="${OUT:-gpu-results}"
work="$(mktemp -d)"
mkdir -p "$out"
report="$out/kernels.txt"
: >"$report"

large=(--steps 1 --samples 64 --vocab 256 --seq-len 128 --d-model 256 --heads 8 --d-mlp 1024 --layers 4 --models 1)
profile() {  # profile KERNEL_REGEX PROGRAM ARGS...: the first launch whose demangled name matches
  local kernel="$1"
  shift
  echo "######## $kernel ($*)" >>"$report"
  timeout 120 ncu --clock-control none --kernel-name-base demangled --kernel-name "regex:$kernel" --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis_Tables --section SourceCounters \
    --print-kernel-base function "$@" >>"$report" 2>&1
}
train=("$bin/train_pair" --device cuda --overwrite --test-samples 64 --out "$work/run" --steps 1)
for precision in fp32 tf32; do
  tile=$([ "$precision" = tf32 ] && echo Tf32Tile || echo Fp32Tile)
  profile "mlp_kernel<false, .*$tile>" "${train[@]}" --samples 64 --precision "$precision"
  profile "mlp_kernel<true, .*$tile>" "${train[@]}" --samples 64 --precision "$precision"
done
profile 'attention_forward_flash_kernel<2, false>' "${train[@]}" --samples 64
profile 'attention_backward_flash_kernel<2, false, false>' "${train[@]}" --samples 64
for precision in fp32 tf32; do
  tf32=$([ "$precision" = tf32 ] && echo true || echo false)
  profile "attention_forward_flash_kernel<4, $tf32>" "${train[@]}" "${large[@]}" --precision "$precision"
  profile "attention_backward_flash_kernel<4, $tf32, $tf32>" "${train[@]}" "${large[@]}" --precision "$precision"
done
rm -rf "$work"
wc -l "$report"
