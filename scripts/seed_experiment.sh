#!/usr/bin/env bash
# The seed experiment with programs already built: trains the default pair into
# OUT, correlates it and writes OUT/correlation/report.html.
# Usage: seed_experiment.sh OUT [train_pair flags...]; BIN names the programs' folder
# (default: this script's folder).
set -euo pipefail

out="${1:?usage: seed_experiment.sh OUT [train_pair flags...]}"
shift
bin="${BIN:-$(dirname "$0")}"
"$bin"/train_pair --out "$out" --overwrite "$@"
"$bin"/correlate "$out" --out "$out/correlation"
