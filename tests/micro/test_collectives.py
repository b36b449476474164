"""parabench-micro's collectives (bench/micro/collectives.cpp) under `mpiexec -n N`: the names and sizes
nccl-tests would time, no failed check, busbw = algbw · nccl-tests' factor, the result file's
/micro/collectives tables, and a wrong element planted in the MPI library's result found by the data
check on every rank.

The planted error comes from outside the program: a small PMPI library (compiled here with mpicc,
loaded with LD_PRELOAD) that overwrites the last element of rank 1's fp32 result of each collective
(and of rank 1's message to rank 0), so production code carries no test hook.

Environment: PB_BIN_DIR (default <repo>/build/bench), PB_MPIEXEC (default mpiexec), PB_MPICC (default
mpicc: the compiler of the MPI parabench-micro links).
"""

import json
import math
import os
import subprocess
from pathlib import Path

os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"  # before h5py opens a file

import h5py  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MICRO = BIN_DIR / "micro" / "parabench-micro"
MPIEXEC = os.environ.get("PB_MPIEXEC", "mpiexec")
MPICC = os.environ.get("PB_MPICC", "mpicc")
DROPPED_ENV_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "PARABENCH_", "HYDRA_", "MPIR_")
# One or a few iterations per benchmark (Google Benchmark 1.7: seconds): the test is about names,
# checks and ratios, never about speed, and 3 or 4 ranks share 2 cores.
FAST = ["--benchmark_min_time=0.00001"]
FP32_BYTES = 4
OPS = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv"]


def run_micro(ranks, args, tmp_path, env_extra=None, timeout=240):
    if not MICRO.is_file():
        pytest.fail(f"{MICRO} does not exist: build it (cmake --build build --target parabench-micro) "
                    "or set PB_BIN_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
    env.update(env_extra or {})
    cmd = [MPIEXEC, "-n", str(ranks), str(MICRO), r"--benchmark_filter=^coll/", "--benchmark_format=json",
           "--out", str(tmp_path / "micro.h5"), *FAST, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def expected_benchmarks(ranks, max_bytes, min_bytes=8):
    """{name: (table, in_place, bytes, busbw factor, group size)} as nccl-tests sizes them: sizes min_bytes
    to max_bytes in powers of 2; the ops that split the buffer in `ranks` blocks round the element count down
    to a multiple of ranks and leave out sizes where that is 0."""
    factors = {"all_reduce": 2 * (ranks - 1) / ranks, "all_gather": (ranks - 1) / ranks,
               "reduce_scatter": (ranks - 1) / ranks, "all_to_all": (ranks - 1) / ranks,
               "broadcast": 1.0, "send_recv_intra": 1.0}
    variants = {"all_reduce": [True], "all_gather": [False, True], "reduce_scatter": [False],
                "all_to_all": [False], "broadcast": [True], "send_recv_intra": [False]}
    split = {"all_gather", "reduce_scatter", "all_to_all"}
    expected = {}
    size = min_bytes
    while size <= max_bytes:
        for table, in_places in variants.items():
            count = size // FP32_BYTES
            if table in split:
                count -= count % ranks
            if count == 0:
                continue
            group = 2 if table.startswith("send_recv") else ranks
            for in_place in in_places:
                name = f"coll/mpi/{table}/{'in_place' if in_place else 'out_of_place'}/{count * FP32_BYTES}"
                expected[name] = (table, in_place, count * FP32_BYTES, factors[table], group)
        size *= 2
    return expected


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_every_op_and_size_checked_with_nccl_tests_bandwidths(ranks, tmp_path):
    max_bytes = 64 * 1024 if ranks == 2 else 16 * 1024  # 3 and 4 ranks oversubscribe the cores
    result = run_micro(ranks, ["--comm", "mpi", "--max-bytes", str(max_bytes)], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    runs = {b["name"].removesuffix("/manual_time"): b for b in report["benchmarks"]}
    expected = expected_benchmarks(ranks, max_bytes)
    assert sorted(runs) == sorted(expected)
    if ranks == 3:
        assert "coll/mpi/all_gather/out_of_place/12" in runs  # 16 B: 4 elements, rounded down to 3
        assert not any(n.startswith("coll/mpi/all_gather/") and n.endswith("/8") for n in runs)  # 2 elements: 0
    for name, (table, in_place, size, factor, group) in expected.items():
        bench = runs[name]
        assert not bench.get("error_occurred"), bench
        seconds = bench["real_time"] * {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[bench["time_unit"]]
        assert bench["algbw"] == pytest.approx(size * 1e-9 / seconds, rel=1e-3)  # GB/s
        if factor == 0:
            assert bench["busbw"] == 0
        else:
            assert bench["busbw"] / bench["algbw"] == pytest.approx(factor, rel=1e-12)

    # The result file: a table per op, one row per benchmark, no wrong element.
    with h5py.File(tmp_path / "micro.h5", "r") as f:
        tables = f["micro/collectives"]
        assert sorted(tables) == sorted({t for t, *_ in expected.values()})
        for table in tables:
            group = tables[table]
            rows = sorted((size, in_place) for t, in_place, size, *_ in expected.values() if t == table)
            assert sorted(zip(group["bytes"][:].tolist(), group["in_place"][:].astype(bool).tolist())) == rows
            assert (group["count"][:] * FP32_BYTES == group["bytes"][:]).all()
            assert (group["errors"][:] == 0).all()
            factor, size = next((e[3], e[4]) for e in expected.values() if e[0] == table)
            assert group.attrs["busbw_factor"] == pytest.approx(factor, rel=1e-12)
            assert group.attrs["ranks"] == size
            assert group.attrs["nodes"] == 1
            assert group.attrs["comm"] == "mpi"


def test_one_rank_leaves_out_send_recv_with_a_line(tmp_path):
    result = run_micro(1, ["--ops", "send_recv,broadcast", "--max-bytes", "64", "--benchmark_list_tests"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"coll/mpi/broadcast/in_place/{s}/manual_time" for s in (8, 16, 32, 64)]
    lines = [line for line in result.stderr.splitlines() if "send_recv_intra" in line]
    assert len(lines) == 1 and "rank 0 is alone on its node" in lines[0]


# Rank 1 writes -1 (no check value is negative) over the last element of each fp32 result it gets from
# MPI, and over the last element of what it sends point to point. Host control values (MPI_DOUBLE,
# MPI_BYTE) pass untouched.
PLANT_WRONG_ELEMENT_C = r"""
#include <mpi.h>

static int is_rank_1(MPI_Comm comm) {
  int rank = 0;
  PMPI_Comm_rank(comm, &rank);
  return rank == 1;
}
static int group_size(MPI_Comm comm) {
  int size = 1;
  PMPI_Comm_size(comm, &size);
  return size;
}
static void plant(void* buf, long count, MPI_Datatype type, MPI_Comm comm) {
  if (type == MPI_FLOAT && count > 0 && is_rank_1(comm)) ((float*)buf)[count - 1] = -1.0f;
}

int MPI_Allreduce(const void* s, void* r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
  int rc = PMPI_Allreduce(s, r, n, t, op, c);
  plant(r, n, t, c);
  return rc;
}
int MPI_Allgather(const void* s, int sn, MPI_Datatype st, void* r, int rn, MPI_Datatype rt, MPI_Comm c) {
  int rc = PMPI_Allgather(s, sn, st, r, rn, rt, c);
  plant(r, (long)rn * group_size(c), rt, c);
  return rc;
}
int MPI_Reduce_scatter_block(const void* s, void* r, int rn, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
  int rc = PMPI_Reduce_scatter_block(s, r, rn, t, op, c);
  plant(r, rn, t, c);
  return rc;
}
int MPI_Alltoall(const void* s, int sn, MPI_Datatype st, void* r, int rn, MPI_Datatype rt, MPI_Comm c) {
  int rc = PMPI_Alltoall(s, sn, st, r, rn, rt, c);
  plant(r, (long)rn * group_size(c), rt, c);
  return rc;
}
int MPI_Bcast(void* buf, int n, MPI_Datatype t, int root, MPI_Comm c) {
  int rc = PMPI_Bcast(buf, n, t, root, c);
  plant(buf, n, t, c);
  return rc;
}
int MPI_Isend(const void* buf, int n, MPI_Datatype t, int peer, int tag, MPI_Comm c, MPI_Request* req) {
  plant((void*)buf, n, t, c);
  return PMPI_Isend(buf, n, t, peer, tag, c, req);
}
"""


def test_planted_wrong_element_fails_every_benchmark_on_every_rank(tmp_path):
    source = tmp_path / "plant_wrong_element.c"
    source.write_text(PLANT_WRONG_ELEMENT_C)
    library = tmp_path / "libplant_wrong_element.so"
    subprocess.run([MPICC, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=120)
    # 3 ranks: rank 2 finds nothing wrong and must still skip with the others (else the job hangs).
    result = run_micro(3, ["--comm", "mpi", "--min-bytes", "64", "--max-bytes", "128"], tmp_path,
                       env_extra={"LD_PRELOAD": str(library)}, timeout=120)
    assert result.returncode == 3, result.stderr
    runs = {b["name"].removesuffix("/manual_time"): b for b in json.loads(result.stdout)["benchmarks"]}
    assert sorted(runs) == sorted(expected_benchmarks(3, 128, min_bytes=64))
    for name, bench in runs.items():
        assert bench.get("error_occurred"), name
        # Exactly one wrong element, the last one of a result: the check reads every element.
        message = bench["error_message"]
        first_rank = 0 if "send_recv" in name else 1
        assert message.startswith("1 wrong elements over all ranks"), message
        assert f"the first on rank {first_rank}, element " in message and ": -1, expected " in message, message
        element, checked = message.split(", element ")[1].split(":")[0].split(" of ")
        assert int(element) == int(checked) - 1, message
    with h5py.File(tmp_path / "micro.h5", "r") as f:
        assert f.attrs["status"] in ("failed", b"failed")
        for table in f["micro/collectives"].values():
            assert (table["errors"][:] == 1).all()
            assert all(math.isnan(t) for t in table["time_s"][:])
