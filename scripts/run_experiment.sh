#!/usr/bin/env bash
# The main job: installs what is missing, builds, trains the seed experiment's pair
# (2 models, default flags) into ${OUT:-runs/seed}, correlates their MLP neurons over
# the held-out test split and writes ${OUT}/correlation/report.html.
# Extra arguments go to train_pair.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install_deps.sh
scripts/build.sh
BIN="${BUILD_DIR:-build}" scripts/seed_experiment.sh "${OUT:-runs/seed}" "$@"
