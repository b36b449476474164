// The CPU backend: OpenBLAS sgemm for every matrix product, OpenMP loops for the rest.
#pragma once

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace pb {

// threads: compute threads for BLAS and OpenMP (≥ 1).
std::unique_ptr<Backend> make_cpu_backend(int threads);

// The host CPU's model name (/proc/cpuinfo), for the result file's /system.
std::string cpu_model_name();

}  // namespace pb
