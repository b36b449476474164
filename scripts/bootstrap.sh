#!/usr/bin/env bash
# The README's first command: installs what is missing (Debian 12, as root), builds the CPU preset
# and runs the default demo, parabench-dp on 4 ranks with the small model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset cpu
cmake --build --preset cpu -j "$(nproc)"
echo
echo "== demo: parabench-dp, 4 ranks, model small =="
jobs/run-local dp -n 4 -- --model small "$@"
