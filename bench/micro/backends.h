// The backends parabench-micro times: each is made once in main and shared by all its benchmarks, so
// that library set-up (oneDNN primitives, cuBLAS handles, allocator caches) is not paid per benchmark.
#pragma once

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/communicator.h"
#include "kernels/backend.h"
#include "kernels/cpu/sgemm.h"

namespace pb {

struct MicroBackend {
  std::string name;   // "cpu", "cuda": the second part of a benchmark's name
  std::string dtype;  // "fp32", "bf16": the tensors' storage (and the matrix products' operands)
  bool accelerator = false;  // a GPU: the large square shapes are timed only here
  std::unique_ptr<Backend> backend;
  // The device's dense peak for this dtype and its memory bandwidth (SPEC 6's table for known GPUs),
  // NaN where unknown (CPUs): the denominators of a result's peak_fraction.
  double peak_flop_per_s = std::numeric_limits<double>::quiet_NaN();
  double peak_bytes_per_s = std::numeric_limits<double>::quiet_NaN();
};

// The CPU backend with `threads` compute threads and `sgemm` for its fp32 products, in fp32 and bf16; then
// those of add_cuda_backends.
std::vector<MicroBackend> make_micro_backends(int threads, cpu::SgemmLibrary sgemm);

// Appends the CUDA backends (fp32, bf16) of this rank's device, node-local rank modulo the visible
// devices as the apps choose it, when this build has the CUDA backend and a GPU is visible; returns
// what was found, for the benchmark context ("NVIDIA H200", "no GPU visible", ...). Defined in
// cuda_backends.cpp (configured with PB_CUDA) or no_cuda_backends.cpp (without).
std::string add_cuda_backends(std::vector<MicroBackend>* backends, int local_rank);
// The PCI bus id of the GPU this rank's cuda backends drive (its node-local rank modulo the visible
// devices); empty without one (or without CUDA in the build).
std::string micro_device_id(int local_rank);

// NCCL over every rank of the job on the last CUDA backend's device and stream, where this build has
// NCCL and `backends` holds a CUDA backend; else nullptr. Collective over MPI_COMM_WORLD.
std::unique_ptr<Communicator> make_nccl_world(std::vector<MicroBackend>& backends);

}  // namespace pb
