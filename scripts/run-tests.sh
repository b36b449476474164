#!/usr/bin/env bash
# The README's second command (and .ci/run's): installs what is missing, builds the CPU preset and
# runs the whole test suite with ctest. Extra arguments go to ctest (e.g. -R unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset cpu
cmake --build --preset cpu -j "$(nproc)"
export HDF5_USE_FILE_LOCKING=FALSE
ctest --preset cpu "$@"
