#!/usr/bin/env bash
# Installs what parabench needs to build and test on a Debian 12 machine (as root).
# Without root (a cluster login node) it lists what is missing and which modules to load instead.
set -euo pipefail

debian_packages=(
  cmake g++ make pkg-config git
  mpich libmpich-dev
  libhdf5-dev hdf5-tools
  libopenblas-dev libopenblas-openmp-dev libdnnl-dev
  libcli11-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3-numpy python3-h5py python3-torch python3-pytest python3-matplotlib python3-pandas python3-venv shellcheck
  slurm-wlm munge
)

# The cuDNN frontend's headers (header-only, MIT; PyPI's nvidia-cudnn-frontend carries them), for the CUDA
# backend's cuDNN attention: fetched into third_party/cudnn-frontend/include where a CUDA toolkit is, once.
# Without them (no PyPI on this machine) the CUDA build keeps parabench's own attention kernels.
cudnn_frontend_version=1.32.0
fetch_cudnn_frontend() {
  local dest=third_party/cudnn-frontend
  [[ -f $dest/include/cudnn_frontend.h ]] && return 0
  command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]] || return 0
  local tmp
  tmp=$(mktemp -d)
  # The headers are the same in every wheel: one fixed wheel, whatever this machine's Python or CPU.
  if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
       --platform manylinux_2_28_x86_64 -d "$tmp" "nvidia-cudnn-frontend==$cudnn_frontend_version" 2>/dev/null; then
    python3 - "$tmp" "$dest" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
dest = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("include/") and not name.endswith("/"):
            z.extract(name, dest)
PY
    echo "setup: cuDNN frontend $cudnn_frontend_version headers in $dest/include"
  else
    echo "setup: the cuDNN frontend could not be fetched from PyPI: CUDA builds use parabench's own attention" >&2
  fi
  rm -rf "$tmp"
}
# ReFrame 4 (reframe-hpc on PyPI) for jobs/reframe's checks and their test, in its own virtual
# environment (third_party/reframe, ignored by git), once. Without PyPI the ReFrame tests say so and skip.
reframe_version=4.10.4
install_reframe() {
  local venv=third_party/reframe
  [[ -x $venv/bin/reframe ]] && "$venv/bin/reframe" --version 2>/dev/null | grep -qx "$reframe_version" && return 0
  rm -rf "$venv"
  if /usr/bin/python3 -m venv "$venv" 2>/dev/null &&
     "$venv/bin/python" -m pip install -q --disable-pip-version-check "reframe-hpc==$reframe_version" 2>/dev/null; then
    echo "setup: ReFrame $reframe_version in $venv"
  else
    rm -rf "$venv"
    echo "setup: ReFrame could not be installed from PyPI: the ReFrame tests will be skipped" >&2
  fi
}
cd "$(dirname "$0")/.."
fetch_cudnn_frontend

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: every package is installed"
  install_reframe
  exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  cat >&2 <<MSG
setup: cannot install without root on Debian; missing: ${missing[*]}
On a cluster, load modules that provide: an MPI (e.g. 'module load openmpi' or 'mpich'),
HDF5 (serial C library), a BLAS (OpenBLAS or MKL), CMake >= 3.25 and a C++17 compiler, optionally
oneDNN (bf16 matrix products on the CPU; without it --dtype bf16 there runs sgemm on rounded operands),
then configure with CLI11 and nlohmann_json found on CMAKE_PREFIX_PATH (both header-only).
Tests also need GoogleTest, and python3 with numpy, h5py, pandas, matplotlib and torch; the
Slurm test (slurm-wlm, munge) skips itself without root; jobs/reframe needs ReFrame 4 (pip install reframe-hpc).
MSG
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
install_reframe
echo "setup: done"
