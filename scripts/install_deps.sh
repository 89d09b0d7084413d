#!/usr/bin/env bash
# Installs what univ builds and tests with: Debian/Ubuntu packages by name, and the
# official numpy and safetensors readers from PyPI for the interop tests. Skips
# whatever is there already.
set -euo pipefail

packages=(cmake make g++ libcli11-dev nlohmann-json3-dev libgtest-dev libopenblas-openmp-dev libopenmpi-dev openmpi-bin
          clang libclang-rt-dev
          python3)
python_packages=(numpy safetensors)

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
  missing+=(python3-pip)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! python3 -c "import numpy, safetensors" >/dev/null 2>&1; then
  echo "install_deps: installing ${python_packages[*]} from PyPI" >&2
  # A distribution's own Python may be marked externally managed (PEP 668).
  python3 -m pip install --quiet "${python_packages[@]}" 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages "${python_packages[@]}"
fi
