"""How often a step makes the host wait for its device (/summary host_waits_per_step; kernels/backend.h,
docs/cuda.md "Host waits").

On a GPU every wait drains the stream: the GPU idles while the host queues the next kernels. A step needs
three: the loss (one download), the gradient norm (one batched sum_squares over all of a rank's tensors)
and the end of the step (one synchronize, so that the step time is the device's). The count is the
interface's (Backend::download, synchronize and sum_squares count themselves), so a CPU run counts what
the same run on a GPU waits for, and this test runs on every machine.

* dp, fsdp (with tp), tp with sequence parallelism, pp and hybrid tp × pp: three waits, whatever the
  number of layers and micro-batches (a norm of one wait per tensor, or a wait per micro-batch or per
  layer, fails);
* ep: five, the routing statistics (counts and auxiliary loss) being two more downloads per step;
* cp, ring and alltoall: three; its attention stopwatch times the attention arithmetic by Backend spans
  (events on a GPU, read after the step's wait), not by waits around each call.
"""

import h5py
import pytest

SHAPE = ["--hidden", "16", "--heads", "2", "--seq", "8", "--vocab", "32", "--ffn", "32", "--steps", "3",
         "--micro-batch", "1"]

# (id, app, ranks, args, waits(layers, micro-batches per rank)); each case runs with 2 and 4 layers and 1 and 4 micro-batches per rank
CASES = [
    ("dp", "dp", 2, [], lambda layers, micro: 3),
    ("fsdp-full", "fsdp", 2, ["--shard", "FULL_SHARD"], lambda layers, micro: 3),
    ("fsdp-tp", "hybrid", 4, ["--tp", "2", "--shard", "FULL_SHARD"], lambda layers, micro: 3),
    ("tp-sp", "tp", 2, ["--tp", "2", "--sequence-parallel"], lambda layers, micro: 3),
    ("pp-1f1b", "pp", 2, ["--pp", "2", "--schedule", "1f1b"], lambda layers, micro: 3),
    ("hybrid-tp-pp", "hybrid", 4, ["--tp", "2", "--pp", "2"], lambda layers, micro: 3),
    ("ep", "ep", 2, ["--ep", "2"], lambda layers, micro: 5),
    ("cp-ring", "cp", 2, ["--cp", "2"], lambda layers, micro: 3),
    ("cp-alltoall", "cp", 2, ["--cp", "2", "--cp-algo", "alltoall"], lambda layers, micro: 3),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("layers,accum", [(2, 1), (4, 4)], ids=["2layers-1micro", "4layers-4micro"])
def test_host_waits_per_step(case, layers, accum, run_app, out_dir):
    name, app, ranks, args, expected = case
    tp = int(args[args.index("--tp") + 1]) if "--tp" in args else 1
    pp = int(args[args.index("--pp") + 1]) if "--pp" in args else 1
    cp = int(args[args.index("--cp") + 1]) if "--cp" in args else 1
    data_ranks = ranks // (tp * pp * cp) if app != "ep" else ranks
    out = out_dir / f"{name}-{layers}-{accum}.h5"
    argv = SHAPE + ["--layers", str(layers), "--global-batch", str(data_ranks * accum), "--out", str(out)] + args
    rc, stdout, stderr = run_app(app, ranks, argv, timeout=120)
    assert rc == 0, run_app.describe(run_app.command(app, ranks, argv), rc, stdout, stderr)
    with h5py.File(out, "r") as f:
        got = int(f["summary"].attrs["host_waits_per_step"])
        assert int(f["summary"].attrs["deterministic"]) == 1  # the CPU backend's ops all are
    assert got == expected(layers, accum), (
        f"{name}: {got} host waits per step with {layers} layers and {accum} micro-batches per rank, "
        f"expected {expected(layers, accum)}")
