"""parabench-micro's collective bandwidths against an independent measurement: the same MPI calls
(MPI_Allreduce in place, MPI_Allgather, MPI_Reduce_scatter_block, MPI_Alltoall) timed directly with
mpi4py on numpy fp32 buffers, over the sizes of a parabench-micro result, printed side by side with the
ratio of the bus bandwidths (parabench-micro / mpi4py).

Run it under the same launcher and rank count as the parabench-micro run it compares with:

    mpiexec -n 2 build/bench/micro/parabench-micro --comm mpi --ops all_reduce,all_gather,reduce_scatter,all_to_all \\
        --max-bytes 256M --benchmark_filter=^coll/ --out micro.h5
    mpiexec -n 2 /tmp/mpi4py-venv/bin/python bench/micro/busbw_vs_mpi4py.py --micro micro.h5

`--micro` takes the HDF5 result file or Google Benchmark's JSON (--benchmark_format=json or
--benchmark_out); without it, only the mpi4py figures are printed, for --min-bytes..--max-bytes.

Two ways of timing (--method):
  batch     as nccl-tests: warm-up calls, then a batch of back-to-back calls between two barriers; the time
            per call is the batch's time over its calls, the slowest rank's (default).
  per-call  as parabench-micro: a barrier before every call, each call timed alone, the slowest rank's
            time per call, averaged.
A batch hides each call's start-up behind the previous call's end, so small messages look faster in it;
per-call should agree with parabench-micro to the noise of the machine. On a shared machine that noise
is large (other jobs on the same cores move either figure by 2x): restrict parabench-micro to the sizes
of interest (--benchmark_filter), run the two back to back, and repeat.

mpi4py must be built against the MPI parabench-micro uses. On Debian with MPICH do NOT install
python3-mpi4py (it is built for Open MPI and switches the system's MPI alternatives away from MPICH);
build it from PyPI into a virtual environment that still sees Debian's numpy and h5py:

    /usr/bin/python3 -m venv --system-site-packages /tmp/mpi4py-venv
    MPICC=/usr/bin/mpicc.mpich /tmp/mpi4py-venv/bin/pip install --no-binary mpi4py mpi4py

(--no-binary: PyPI's mpi4py wheel looks for libmpi.so.12, which Debian's MPICH names libmpich.so.12.)
"""

import argparse
import json
import math
import re
import statistics
import sys

import numpy as np
from mpi4py import MPI

OPS = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]
BUSBW_FACTOR = {  # nccl-tests' PERFORMANCE.md, n ranks
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}
# The variant parabench-micro times that matches the MPI call below (all_gather also runs in place).
VARIANT = {"all_reduce": 1, "all_gather": 0, "reduce_scatter": 0, "all_to_all": 0}
FP32_BYTES = 4


def parse_size(text):
    match = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text}: a size such as 8, 64K, 1M, 256M")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def micro_figures(path):
    """{(op, bytes): seconds per call} of parabench-micro's matching variant, and its rank count."""
    figures = {}
    if path.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            ranks = int(f["config"].attrs["world_size"])
            for op, table in f["micro/collectives"].items():
                if op not in OPS:
                    continue
                for size, in_place, seconds in zip(table["bytes"][:], table["in_place"][:], table["time_s"][:]):
                    if int(in_place) == VARIANT[op]:
                        figures[(op, int(size))] = float(seconds)
        return figures, ranks
    with open(path) as f:
        report = json.load(f)
    ranks = int(report["context"]["ranks"])
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    for bench in report["benchmarks"]:
        match = re.fullmatch(r"coll/mpi/(\w+)/(in_place|out_of_place)/(\d+)(/manual_time)?", bench["run_name"])
        if not match or match.group(1) not in OPS or bench.get("error_occurred"):
            continue
        op, variant, size = match.group(1), match.group(2), int(match.group(3))
        # With repetitions, the median aggregate; otherwise the one run.
        if bench.get("run_type") == "aggregate" and bench.get("aggregate_name") != "median":
            continue
        if int(variant == "in_place") == VARIANT[op]:
            figures[(op, size)] = bench["real_time"] * unit[bench["time_unit"]]
    return figures, ranks


class Collective:
    """One op at one size on fp32 numpy buffers, counts as parabench-micro's (collectives.cpp)."""

    def __init__(self, comm, op, size):
        n = comm.size
        count = size // FP32_BYTES
        if op != "all_reduce":
            count -= count % n
        self.comm, self.op, self.count, self.n = comm, op, count, n
        self.bytes = count * FP32_BYTES
        block = count // n
        if op == "all_reduce":  # zeros: repeated in-place sums stay finite
            self.buf = np.zeros(count, np.float32)
            self.call = lambda: comm.Allreduce(MPI.IN_PLACE, [self.buf, MPI.FLOAT], op=MPI.SUM)
        elif op == "all_gather":
            self.send, self.recv = np.ones(block, np.float32), np.zeros(count, np.float32)
            self.call = lambda: comm.Allgather([self.send, MPI.FLOAT], [self.recv, MPI.FLOAT])
        elif op == "reduce_scatter":
            self.send, self.recv = np.ones(count, np.float32), np.zeros(block, np.float32)
            self.call = lambda: comm.Reduce_scatter_block([self.send, MPI.FLOAT], [self.recv, MPI.FLOAT], op=MPI.SUM)
        else:
            self.send, self.recv = np.ones(count, np.float32), np.zeros(count, np.float32)
            self.call = lambda: comm.Alltoall([self.send, MPI.FLOAT], [self.recv, MPI.FLOAT])

    def slowest(self, seconds):
        return self.comm.allreduce(seconds, op=MPI.MAX)

    def batch(self, calls):
        self.comm.Barrier()
        start = MPI.Wtime()
        for _ in range(calls):
            self.call()
        return self.slowest(MPI.Wtime() - start) / calls

    def per_call(self, calls):
        total = 0.0
        for _ in range(calls):
            self.comm.Barrier()
            start = MPI.Wtime()
            self.call()
            total += self.slowest(MPI.Wtime() - start)
        return total / calls

    def seconds_per_call(self, method, min_time, repetitions):
        """Median over repetitions of the time per call; each repetition runs enough calls to last
        min_time (decided from the slowest rank's time, so every rank runs the same calls)."""
        timed = self.batch if method == "batch" else self.per_call
        for _ in range(5):  # warm-up: connections, first touch of the buffers
            self.call()
        one = timed(1)
        calls = max(1, min(100000, math.ceil(min_time / max(one, 1e-9))))
        return statistics.median(timed(calls) for _ in range(repetitions))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro", help="parabench-micro's result: the .h5 file or Google Benchmark's JSON")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, of " + ", ".join(OPS))
    parser.add_argument("--min-bytes", type=parse_size, default=8)
    parser.add_argument("--max-bytes", type=parse_size, default=256 << 20)
    parser.add_argument("--method", choices=["batch", "per-call"], default="batch")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per repetition (default 0.05)")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    lead = comm.rank == 0
    ops = args.ops.split(",")
    if any(op not in OPS for op in ops):
        parser.error(f"--ops {args.ops}: each of {', '.join(OPS)}")

    micro, micro_ranks = ({}, comm.size) if not args.micro else micro_figures(args.micro)
    if micro_ranks != comm.size:
        if lead:
            print(f"busbw_vs_mpi4py: {args.micro} ran on {micro_ranks} ranks, this on {comm.size}", file=sys.stderr)
        return 2
    if micro:
        cases = sorted((op, size) for op, size in micro if op in ops)
    else:
        sizes = []
        size = args.min_bytes
        while size <= args.max_bytes:
            sizes.append(size)
            size *= 2
        cases = [(op, s) for op in ops for s in sizes]

    if lead:
        print(f"# {comm.size} ranks, fp32, mpi4py {args.method}: {MPI.Get_library_version().splitlines()[0]}")
        print(f"# {'op':<15}{'size (B)':>11}{'micro us':>11}{'algbw':>9}{'busbw':>9}"
              f"{'mpi4py us':>11}{'algbw':>9}{'busbw':>9}{'ratio':>8}   (GB/s; ratio = micro / mpi4py busbw)")
    for op, size in cases:
        collective = Collective(comm, op, size)
        if collective.count == 0:
            continue
        seconds = collective.seconds_per_call(args.method, args.min_time, args.repetitions)
        factor = BUSBW_FACTOR[op](comm.size)
        algbw = collective.bytes / seconds / 1e9
        mine = micro.get((op, collective.bytes), float("nan"))
        micro_algbw = collective.bytes / mine / 1e9
        ratio = micro_algbw / algbw
        if lead:
            print(f"  {op:<15}{collective.bytes:>11}{mine * 1e6:>11.2f}{micro_algbw:>9.3f}{micro_algbw * factor:>9.3f}"
                  f"{seconds * 1e6:>11.2f}{algbw:>9.3f}{algbw * factor:>9.3f}{ratio:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
