"""parabench's ReFrame checks (ReFrame 4): one check per point of the project's sweeps, the same points
that jobs/submit renders as Slurm job arrays (jobs/lib/sweep.sh), so a site's acceptance run and its
jobs/submit sweeps measure the same configurations.

Each check runs one app (parabench-dp, -fsdp, -tp, -pp, -ep, -cp, -hybrid) on the point's nodes × ranks
per node with the partition's launcher. Sanity: the rank-0 line `PARABENCH_RESULT ... status=complete`
(SPEC 5) with the check's rank count. Performance variables, from the same line: tokens_per_s
(tokens/s), step_time (s, the median measured step), tflops_per_rank (TFLOP/s), mfu (%, only where the
run knows its peak: a GPU of the app's table or the profile's PB_PEAK_TFLOPS) and peak_memory (GiB, the
largest rank's). The result file is kept as `result.h5` in the check's output folder.

Environment, read when ReFrame loads this file (parabench_points.py, jobs/reframe/README.md):
  PB_CLUSTER              the profile jobs/clusters/<name>.env whose allocation the sweeps use and
                          which the job sources before it starts the ranks (its exports: NCCL_*, UCX_*);
                          default: the ReFrame system's name where such a profile exists, else local
  PB_REFRAME_SWEEPS       sweeps and their options, ';'-separated (default "strategy"), e.g.
                          "strategy; weak-scaling --nodes 1,2,4; micro-batch --values 1,2,4"
  PB_REFRAME_ARGS         app arguments for every point (as after jobs/submit's --), e.g. "--model gpt2-124m"
  PB_REFRAME_REFERENCES   the references file (default jobs/reframe/references.json)
  PB_BUILD_DIR            the build whose apps run (default: the profile's, else build)
"""

import math
import os
import shlex
import sys
from pathlib import Path

import reframe as rfm
import reframe.core.runtime as rt
import reframe.utility.osext as osext
import reframe.utility.sanity as sn
from reframe.core.builtins import parameter, run_after, run_before, sanity_function, variable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parabench_points import (PROFILES, REPO, load_references, profile_name, read_profile,  # noqa: E402
                    references_for, slurm_seconds, sweep_points)

RESULT = "result.h5"
# The rank-0 line of SPEC 5; every field a performance variable reads, by name.
RESULT_LINE = (r"^PARABENCH_RESULT app=(?P<app>\S+) ranks=(?P<ranks>\d+) step_time_s=(?P<step_time>\S+) "
               r"tokens_per_s=(?P<tokens_per_s>\S+) tflops_per_rank=(?P<tflops_per_rank>\S+) mfu=(?P<mfu>\S+) "
               r"peak_mem_bytes=(?P<peak_mem_bytes>\d+) status=(?P<status>\S+) file=")


def system_name():
    try:
        return rt.runtime().system.name
    except Exception:  # loaded outside a ReFrame session
        return ""


PROFILE = profile_name(system_name())
SETTINGS = read_profile(PROFILE)
POINTS = sweep_points(PROFILE)
REFERENCES = load_references()


@rfm.simple_test
class parabench_point(rfm.RunOnlyRegressionTest):
    """One point of a parabench sweep: an app on nodes × ranks per node, its throughput and memory."""

    point = parameter(POINTS, fmt=lambda p: p.name)
    valid_systems = ["*"]
    valid_prog_environs = ["*"]
    maintainers = ["parabench"]
    build_dir = variable(str, value=os.environ.get("PB_BUILD_DIR") or SETTINGS.get("PB_BUILD_DIR") or "build")
    keep_files = [RESULT]

    @run_after("init")
    def describe(self):
        p = self.point
        self.descr = f"parabench-{p.app} {' '.join(p.args)} on {p.nodes} node(s) x {p.ranks_per_node} rank(s)"
        self.tags = {"parabench", p.sweep, p.app, f"nodes={p.nodes}"}

    @run_after("setup")
    def set_job(self):
        p = self.point
        build = Path(self.build_dir)
        build = build if build.is_absolute() else REPO / build
        self.executable = str(build / "bench" / p.app / f"parabench-{p.app}")
        if not Path(self.executable).is_file():  # fail here, naming it, not as a sanity error later
            raise FileNotFoundError(f"{self.executable} not found: build parabench first (README; "
                                    f"PB_BUILD_DIR={self.build_dir})")
        opts = list(p.args)
        if "--cluster" not in opts:
            opts += ["--cluster", SETTINGS.get("PB_CLUSTER_NAME") or PROFILE]
        peak = SETTINGS.get("PB_PEAK_TFLOPS", "")
        if peak not in ("", "0") and "--peak-tflops" not in opts:
            opts += ["--peak-tflops", peak]
        self.executable_opts = [*map(shlex.quote, opts), "--out", RESULT]
        self.num_tasks = p.nodes * p.ranks_per_node
        self.num_tasks_per_node = p.ranks_per_node
        cpus = SETTINGS.get("PB_CPUS_PER_NODE", "")
        if cpus:
            self.num_cpus_per_task = max(1, int(cpus) // p.ranks_per_node)
        if SETTINGS.get("PB_TIME"):
            self.time_limit = slurm_seconds(SETTINGS["PB_TIME"])
        # The profile's exports (NCCL_*, UCX_*, ...) as jobs/<app>.sbatch has them; modules come from
        # the ReFrame environment.
        self.prerun_cmds = [f"source {shlex.quote(str(PROFILES / (PROFILE + '.env')))}"]
        self.env_vars = {"HDF5_USE_FILE_LOCKING": "FALSE"}
        if self.current_partition.scheduler.registered_name in ("slurm", "squeue"):
            self.job.options += [f"--nodes={p.nodes}", "--no-requeue"]
            gpus = int(SETTINGS.get("PB_GPUS_PER_NODE") or 0)
            if gpus > 0:  # one GPU per rank, never --gpus-per-task (it hides NVLink from NCCL)
                self.job.options += [f"--gpus-per-node={min(gpus, p.ranks_per_node)}"]
        if self.job.launcher.registered_name == "srun":
            if SETTINGS.get("PB_SRUN_MPI"):
                self.job.launcher.options += [f"--mpi={SETTINGS['PB_SRUN_MPI']}"]
            if SETTINGS.get("PB_CPU_BIND"):
                self.job.launcher.options += [f"--cpu-bind={SETTINGS['PB_CPU_BIND']}"]

    @run_after("setup")
    def set_references(self):
        """From references.json (points.references_for: the more specific entries win)."""
        merged = references_for(REFERENCES, self.current_system.name, self.current_partition.name, self.point.name)
        self.reference = {f"{self.current_system.name}:{self.current_partition.name}": merged} if merged else {}

    def result(self, field, conv=float):
        return sn.extractsingle(RESULT_LINE, self.stdout, field, conv)

    @sanity_function
    def completed(self):
        return sn.all([
            sn.assert_found(RESULT_LINE, self.stdout, msg="no PARABENCH_RESULT line in the output"),
            sn.assert_eq(self.result("status", str), "complete"),
            sn.assert_eq(self.result("ranks", int), self.num_tasks),
            sn.assert_eq(self.result("app", str), self.point.app),
        ])

    @run_before("performance")
    def set_perf_variables(self):
        self.perf_variables = {
            "tokens_per_s": sn.make_performance_function(self.result("tokens_per_s"), "tokens/s"),
            "step_time": sn.make_performance_function(self.result("step_time"), "s"),
            "tflops_per_rank": sn.make_performance_function(self.result("tflops_per_rank"), "TFLOP/s"),
            "peak_memory": sn.make_performance_function(self.result("peak_mem_bytes") / 2**30, "GiB"),
        }
        # MFU where the run knew its peak (a GPU of the app's table, or PB_PEAK_TFLOPS); nan otherwise,
        # which no reference could bound.
        with osext.change_dir(self.stagedir):  # where ReFrame itself reads the output
            mfu = sn.evaluate(self.result("mfu"))
        if not math.isnan(mfu):
            self.perf_variables["mfu"] = sn.make_performance_function(self.result("mfu") * 100, "%")
