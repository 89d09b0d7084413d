#!/usr/bin/env bash
# Configures and builds univ into ${BUILD_DIR:-build} (Release). CUDA is built when nvcc
# is found (on PATH or in /usr/local/cuda/bin); extra CMake arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="${BUILD_DIR:-build}"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
