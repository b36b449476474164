// The Communicator's collectives, timed as nccl-tests times them: every rank runs the same Google
// Benchmark loop, each iteration's time is the slowest rank's (manual timing), and the data each call
// delivers is checked (a wrong element is an error). Names: coll/<comm>/<op>/<in_place|out_of_place>/<bytes>.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench/micro/busbw.h"  // busbw_factor
#include "common/communicator.h"
#include "kernels/backend.h"

namespace pb {

// The ops parabench-micro times, in the order of its table.
const std::vector<std::string>& collective_op_names();  // all_reduce, all_gather, reduce_scatter,
                                                        // all_to_all, broadcast, send_recv

struct CollectiveRequest {
  std::vector<std::string> ops;  // from collective_op_names()
  int64_t min_bytes = 8, max_bytes = int64_t{1} << 30;  // min_bytes, doubling, up to max_bytes
  DType dtype = DType::f32;
};

// Registers every op and size (and its MicroEntry, table "collectives/<op>"; send_recv: tables
// "collectives/send_recv_intra" and, with ranks on several nodes, "collectives/send_recv_inter").
// `world` is every rank's communicator (MPI, or NCCL on GPUs), `backend` owns the buffers; `control`
// is an MPI communicator of the same ranks for the max of the times and the error counts. All must
// outlive RunSpecifiedBenchmarks. A wrong result (or a set-up that failed on any rank) increments
// `failed_checks` on every rank and reports the benchmark as an error on every rank; the number of wrong
// elements, summed over the ranks, goes to set_micro_wrong_elements (registry.h).
void register_collective_benchmarks(Communicator& world, Communicator& control, Backend& backend,
                                    const CollectiveRequest& request, int* failed_checks);

}  // namespace pb
