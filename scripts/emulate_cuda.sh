#!/usr/bin/env bash
# Checks the CUDA code without a GPU: builds the library against a host emulator of
# CUDA (tests/emulator: each CUDA thread a fiber, barriers released when every thread
# is there, graphs replayed in random orders their edges allow), compares whole
# training steps with the CPU backend and correlate's statistics with float64
# references, then runs the GPU suite (tests/test_cuda*.cpp) with the emulator as its
# device. Logic, indexing, barriers and stream ordering are checked; performance and
# the GPU's memory model are not.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="${BUILD_DIR:-build-emulated}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DUNIV_ENABLE_CUDA=OFF -DUNIV_ENABLE_MPI=OFF \
  -DUNIV_CUDA_EMULATION=ON "$@" >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target emulated_cuda_training emulated_cuda_statistics emulated_gpu_tests
OMP_NUM_THREADS=1 "$build_dir/tests/emulated_cuda_training"
"$build_dir/tests/emulated_cuda_statistics"
ctest --test-dir "$build_dir" --output-on-failure -R '^emulated\.gpu_tests$'
