#!/usr/bin/env bash
# Runs a parabench app (parabench-dp, parabench-ep, ...) on one rank for 5 steps with --dump-gradients
# and checks the losses, the grad norms, the step-0 gradients and, when the result file has /moe, the
# MoE routing statistics and aux loss against the PyTorch reference (tests/reference/check_against_torch.py).
# Usage: run_reference.sh APP PYTHON MODEL-OPTIONS...   (e.g. --experts 4 --top-k 2 --capacity-factor 1.25 for ep)
# PB_REF_RTOL (default 1e-4) and PB_REF_DEVICE (cpu or cuda, where the reference runs) adjust the check:
# the GPU check runs the app with --backend cuda among its options.
set -euo pipefail
app=$1 python=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mpiexec -n 1 "$app" "$@" --steps 5 --warmup 1 --threads 2 --quiet \
  --out "$work/run.h5" --dump-gradients "$work/dump.h5"
"$python" "$here/check_against_torch.py" --dump "$work/dump.h5" --rtol "${PB_REF_RTOL:-1e-4}" \
  --device "${PB_REF_DEVICE:-cpu}" --result "$work/run.h5"
