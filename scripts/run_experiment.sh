#!/usr/bin/env bash
# The main job: installs what is missing, builds, and trains the seed experiment's
# pair (2 models, default flags) into ${OUT:-runs/seed}. Extra arguments go to train_pair.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install_deps.sh
scripts/build.sh
out="${OUT:-runs/seed}"
"${BUILD_DIR:-build}"/train_pair --out "$out" --overwrite "$@"
