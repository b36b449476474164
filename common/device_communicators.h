// Communicators for device buffers (built with CUDA only; see kernels/cuda).
//
// NCCL: device buffers go straight to NCCL. A blocking call is queued on the compute stream, so every
// later use of its buffers sees its result, and returns without waiting: its time is the GPU time of the
// collective (CUDA events, read once it has completed), not of the work queued before it. A
// non-blocking call runs on a communication stream after the compute stream's queued work, so that it
// overlaps the compute queued after it; waiting on it orders the compute stream after it. A watchdog
// thread per communicator polls NCCL's asynchronous error and the oldest unfinished operation's
// deadline (`timeout_s`, --distributed-timeout-minutes); on either it aborts the communicator and the
// run ends with exit 3 at its next wait (common/watchdog.h).
//
// Host-staged MPI (--comm mpi with the CUDA backend): every device buffer is copied to pinned host
// memory, the MPI call runs on the copy, and results are copied back; the copies count in the time.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <memory>

#include "common/communicator.h"

namespace pb {

// Takes ownership of `comm` (a communicator of its own: split or dup'ed). Collective over `comm`. An
// operation unfinished after `timeout_s` seconds aborts the communicator (exit 3).
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm, cudaStream_t compute, double timeout_s);

std::unique_ptr<Communicator> make_host_staged_communicator(std::unique_ptr<Communicator> host,
                                                            cudaStream_t compute);

}  // namespace pb
