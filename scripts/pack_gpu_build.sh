#!/usr/bin/env bash
# Builds the CUDA configuration for sm_90 into build-gpu and stages in build-gpu-dist what
# a GPU host without this project's development packages needs to run it: the programs,
# the CTest files, and the shared libraries that neither a base system nor the CUDA
# toolkit provides (OpenBLAS and its runtime); build-gpu-pack/dist.tar.gz holds the same,
# a quarter of the size, for copying. There, unpack it in the source tree (tar -xzf
# build-gpu-pack/dist.tar.gz) and run `scripts/gpu_check.sh --prebuilt`.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=build-gpu scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90 -DUNIV_ENABLE_MPI=OFF
rm -rf build-gpu-dist
mkdir -p build-gpu-dist/lib
tar -C build-gpu --exclude=CMakeFiles --exclude='*.a' --exclude=Testing -cf - . | tar -C build-gpu-dist -xf -
ldd build-gpu/train_pair | awk '$1 ~ /^lib(openblas|gfortran|quadmath|gomp)/ {print $3}' |
  while read -r lib; do cp -L "$lib" build-gpu-dist/lib/; done
mkdir -p build-gpu-pack
tar -czf build-gpu-pack/dist.tar.gz build-gpu-dist
du -sh build-gpu-dist build-gpu-pack/dist.tar.gz
