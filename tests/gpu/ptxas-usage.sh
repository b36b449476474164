#!/usr/bin/env bash
# Registers, spills and shared memory of the CUDA kernels as ptxas reports them for one architecture,
# without a GPU: cuda_backend.cu compiled once more with -Xptxas -v, with the flags of a configured CUDA
# build. Usage: tests/gpu/ptxas-usage.sh [BUILD_DIR (build-cuda)] [ARCH (90)] [KERNEL-NAME REGEX (.)]
# Example: tests/gpu/ptxas-usage.sh build-cuda 90 dkv   (the attention backward's dK/dV kernels)
set -euo pipefail
build=${1:-build-cuda}
arch=${2:-90}
pattern=${3:-.}
if [[ ! -f $build/compile_commands.json ]]; then
  echo "ptxas-usage: no $build/compile_commands.json: configure it first (bash tests/gpu/build-cuda.sh)" >&2
  exit 2
fi
command=$(python3 - "$build/compile_commands.json" "$arch" <<'PY'
import json, shlex, sys
entries = [e for e in json.load(open(sys.argv[1])) if e["file"].endswith("kernels/cuda/cuda_backend.cu")]
if not entries:
    sys.exit("ptxas-usage: cuda_backend.cu is not in the compile commands")
entry, arch = entries[0], sys.argv[2]
args = shlex.split(entry["command"])
args[args.index("-o") + 1] = "/dev/null"
args = [a for a in args if not a.startswith("--generate-code") and not a.startswith("-gencode")]
args += [f"--generate-code=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
print("cd " + shlex.quote(entry["directory"]) + " && " + " ".join(shlex.quote(a) for a in args))
PY
)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
bash -c "$command" 2> "$log"
# ptxas prints, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", then its stack and spills,
# then "Used N registers, ..." lines; one line per kernel here, demangled.
awk '/Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
     /spill stores/ { spills = $0; sub(/^ +/, "", spills) }
     /Used [0-9]+ registers/ { sub(/^.*: /, ""); print name "\t" $0 "\t" spills }' "$log" |
  c++filt | grep -E -- "$pattern" | sort
