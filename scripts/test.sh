#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs the whole suite.
# GPU tests skip with a message where no CUDA device is present.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install_deps.sh
scripts/build.sh
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"
