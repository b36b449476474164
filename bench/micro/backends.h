// The backends parabench-micro times: each is made once in main and shared by all its benchmarks, so
// that library set-up (oneDNN primitives, cuBLAS handles, allocator caches) is not paid per benchmark.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace pb {

struct MicroBackend {
  std::string name;   // "cpu", "cuda": the second part of a benchmark's name
  std::string dtype;  // "fp32", "bf16": the matrix products' operands (storage is always fp32)
  bool accelerator = false;  // a GPU: the large square shapes are timed only here
  std::unique_ptr<Backend> backend;
};

// The CPU backend with `threads` compute threads in fp32 and bf16, then those of add_cuda_backends.
std::vector<MicroBackend> make_micro_backends(int threads);

// Appends the CUDA backends of device 0 (fp32, bf16) when this build has the CUDA backend and a GPU is
// visible; returns what was found, for the benchmark context ("NVIDIA H200", "no GPU visible", ...).
// Defined in cuda_backends.cpp (configured with PB_CUDA) or no_cuda_backends.cpp (without).
std::string add_cuda_backends(std::vector<MicroBackend>* backends);

}  // namespace pb
