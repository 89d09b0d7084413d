#!/usr/bin/env bash
# Builds the CUDA configuration for sm_90 into build-gpu and stages in build-gpu-dist what
# a GPU host without this project's development packages needs to run it: the programs,
# the CTest files, and the shared libraries that neither a base system nor the CUDA
# toolkit's library folder provides (OpenBLAS and its runtime, CUPTI);
# build-gpu-pack/dist.tar.gz holds the same, a quarter of the size, for copying. There,
# unpack it in the source tree (tar -xzf build-gpu-pack/dist.tar.gz) and run
# `scripts/gpu_check.sh --prebuilt`.
#
#   scripts/pack_gpu_build.sh [BASELINE]   BASELINE: a git revision whose bench_kernels
#       goes along (build-gpu-dist/baseline), for gpu_check.sh to time on the same card
#       as the current build's: cards of one kind differ by up to 20%.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake_args=(-DCMAKE_CUDA_ARCHITECTURES=90 -DUNIV_ENABLE_MPI=OFF)
export PATH="/usr/local/cuda/bin:$PATH"

BUILD_DIR=build-gpu scripts/build.sh "${cmake_args[@]}"
rm -rf build-gpu-dist
mkdir -p build-gpu-dist/lib
tar -C build-gpu --exclude=CMakeFiles --exclude='*.a' --exclude=Testing -cf - . | tar -C build-gpu-dist -xf -
# (and CUPTI, which toolkits keep beside their other libraries or under extras/)
ldd build-gpu/train_pair build-gpu/bench_kernels | awk '$1 ~ /^lib(openblas|gfortran|quadmath|gomp|cupti)/ {print $3}' |
  sort -u | while read -r lib; do cp -L "$lib" build-gpu-dist/lib/; done
if [ $# -gt 0 ]; then
  # The baseline's own source tree and build, kept between packs (build-gpu-baseline).
  revision="$(git rev-parse --short "$1^{commit}")"
  tree=build-gpu-baseline/src
  [ -e "$tree/.git" ] || git worktree add --detach "$tree" "$revision" >/dev/null
  git -C "$tree" checkout -q --detach "$revision"
  cmake -S "$tree" -B "$tree/build" -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" >/dev/null
  cmake --build "$tree/build" -j "$(nproc)" --target bench_kernels
  mkdir -p build-gpu-dist/baseline
  cp "$tree/build/bench_kernels" build-gpu-dist/baseline/
  echo "$revision $(git log -1 --format=%s "$revision")" >build-gpu-dist/baseline/revision
fi
mkdir -p build-gpu-pack
tar -czf build-gpu-pack/dist.tar.gz build-gpu-dist
du -sh build-gpu-dist build-gpu-pack/dist.tar.gz
