// The CPU backends of parabench-micro; the GPU ones come from add_cuda_backends.
#include "bench/micro/backends.h"

#include "kernels/cpu/cpu_backend.h"

namespace pb {

std::vector<MicroBackend> make_micro_backends(int threads, cpu::SgemmLibrary sgemm) {
  std::vector<MicroBackend> backends;
  backends.push_back({"cpu", "fp32", false, make_cpu_backend(threads, /*bf16_matmul=*/false, sgemm)});
  backends.push_back({"cpu", "bf16", false, make_cpu_backend(threads, /*bf16_matmul=*/true, sgemm)});
  return backends;
}

}  // namespace pb
