#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite, runs the
# CPU suite again under AddressSanitizer and UndefinedBehaviorSanitizer, checks the CUDA
# training backend, the statistics and the GPU op tests on the host emulator, and fuzzes
# each file reader briefly. GPU tests skip with a message where no CUDA device is
# present.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install_deps.sh
scripts/build.sh
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"

echo "test: the CPU suite under AddressSanitizer and UndefinedBehaviorSanitizer"
BUILD_DIR=build-sanitize scripts/build.sh -DUNIV_SANITIZE=ON -DUNIV_ENABLE_CUDA=OFF -DUNIV_ENABLE_MPI=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo
ctest --test-dir build-sanitize --output-on-failure -j "$(nproc)"

echo "test: the CUDA training backend, statistics and op tests on the host emulator, against the CPU and float64"
scripts/emulate_cuda.sh

echo "test: fuzzing the safetensors, .npy and statistics readers"
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
