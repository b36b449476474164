# Sourced by jobs/<app>.sbatch with $app set: loads the cluster profile, records the job, the
# modules and the environment next to the result, and starts one rank per task (SPEC.md section 7).
# Inside a Slurm job the ranks start with the profile's launcher; outside one (jobs/run-local
# --sweep, 'bash jobs/<app>.sbatch') with mpiexec, PB_RANKS ranks (default PB_NODES x PB_TASKS_PER_NODE).
# shellcheck shell=bash
: "${app:?jobs/lib/app-job.sh needs app=<name>}"
root=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$root" || exit 2

die() { echo "$app.sbatch: error: $*" >&2; exit 2; }

# shellcheck source-path=SCRIPTDIR source=options.sh
source "$(dirname "${BASH_SOURCE[0]}")/options.sh"

cluster=${PB_CLUSTER:-local}
check_profile_name PB_CLUSTER "$cluster"  # a name in jobs/clusters/, never a path
profile=jobs/clusters/$cluster.env
[[ -f $profile ]] || die "cluster profile $root/$profile not found (PB_CLUSTER=$cluster; submit from the repository root)"
# shellcheck source-path=SCRIPTDIR source=clusters/local.env disable=SC1091
source "$profile"
: "${PB_CLUSTER_NAME:=$cluster}" "${PB_LAUNCHER:=srun}"

if [[ -n ${PB_MODULES:-} ]]; then
  if command -v module >/dev/null 2>&1; then
    read -r -d '' -a modules <<<"$PB_MODULES" || true  # a blank-separated list, not globbed
    set +u  # module scripts read unset variables
    module load "${modules[@]}" || die "module load $PB_MODULES failed"
    set -u
  else
    echo "$app.sbatch: warning: no 'module' command; not loading: $PB_MODULES" >&2
  fi
fi

build_dir=${PB_BUILD_DIR:-build}
bin=${PB_BIN:-$build_dir/bench/$app/parabench-$app}
[[ $bin == /* ]] || bin=$root/$bin
[[ -x $bin ]] || die "$bin not found: run cmake --build ${PB_BUILD_DIR:-build} first (in $root)"
has_option --out "$@" && die "give the result directory as PB_OUT=DIR, not --out"

job_id=${SLURM_JOB_ID:-local-$(date -u +%Y%m%dT%H%M%SZ)-$$}
out=${PB_OUT:-results/$job_id}
check_text PB_OUT "$out"
mkdir -p "$out"

# The job's record, next to its result file.
if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null 2>&1; then
  scontrol show job "$SLURM_JOB_ID" >"$out/slurm_job.txt" 2>&1 || true
fi
if command -v module >/dev/null 2>&1; then
  (set +u; module list) >"$out/modules.txt" 2>&1 || true
fi
cp "$profile" "$out/cluster.env"

export HDF5_USE_FILE_LOCKING=FALSE  # parallel file systems often lack POSIX locks
# The profile's prices reach the ranks, which record them in /system (the report's cost per million tokens).
for var in PB_PRICE_GPU_HOUR PB_PRICE_NODE_HOUR PB_PRICE_KWH PB_CURRENCY; do
  if [[ -n ${!var:-} ]]; then export "${var?}"; fi
done
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun no longer inherits it from sbatch
fi
if [[ -n ${SLURM_GPUS_PER_TASK:-} ]]; then
  echo "$app.sbatch: warning: --gpus-per-task hides NVLink peers from NCCL; use --gpus-per-node" >&2
elif [[ ${PB_GPUS_PER_NODE:-0} -gt 0 && -n ${SLURM_JOB_ID:-} && -z ${SLURM_GPUS_PER_NODE:-} ]]; then
  echo "$app.sbatch: warning: profile $cluster has $PB_GPUS_PER_NODE GPUs per node; pass --gpus-per-node=$PB_GPUS_PER_NODE" >&2
fi
env | sort >"$out/environment.txt"

launcher=$PB_LAUNCHER
[[ -n ${SLURM_JOB_ID:-} ]] || launcher=mpiexec  # no allocation for srun to start ranks in
case $launcher in
  srun)
    launch=(srun)
    [[ -n ${PB_SRUN_MPI:-} ]] && launch+=("--mpi=$PB_SRUN_MPI")
    [[ -n ${PB_CPU_BIND:-} ]] && launch+=("--cpu-bind=$PB_CPU_BIND")
    ;;
  mpiexec)
    ranks=${SLURM_NTASKS:-${PB_RANKS:-$((${PB_NODES:-1} * ${PB_TASKS_PER_NODE:-1}))}}
    launch=(mpiexec -n "$ranks")
    if mpiexec --version 2>&1 | grep -qiE "open ?mpi|openrte"; then
      launch+=(--oversubscribe)
      [[ $(id -u) -eq 0 ]] && launch+=(--allow-run-as-root)
    fi
    ;;
  *) die "PB_LAUNCHER=$PB_LAUNCHER in $profile: use srun or mpiexec" ;;
esac

args=(--out "$out")
has_option --cluster "$@" || args+=(--cluster "$PB_CLUSTER_NAME")
add_profile_options "$app" "$@"

command=("${launch[@]}" "$bin" "${args[@]}" "$@")
printf -v command_line '%q ' "${command[@]}"
echo "${command_line% }" >"$out/command.txt"
echo "$app.sbatch: ${command_line% }" >&2
status=0
"${command[@]}" || status=$?
echo "$app.sbatch: exit $status; records in $out" >&2
exit "$status"
