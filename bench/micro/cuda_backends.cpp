// The CUDA backends of parabench-micro (built with PB_CUDA): device 0 of those CUDA_VISIBLE_DEVICES
// leaves, in fp32 (TF32 off) and with bf16 operands on the tensor cores (kernels/cuda/cuda_backend.h).
#include "bench/micro/backends.h"

#include "kernels/cuda/cuda_backend.h"

namespace pb {

std::string add_cuda_backends(std::vector<MicroBackend>* backends) {
  if (cuda_visible_device_count() == 0) return "no GPU visible: the cuda benchmarks are not registered";
  constexpr int kDevice = 0;
  backends->push_back({"cuda", "fp32", true, make_cuda_backend(kDevice, /*bf16_matmul=*/false)});
  backends->push_back({"cuda", "bf16", true, make_cuda_backend(kDevice, /*bf16_matmul=*/true)});
  return backends->back().backend->device_name();
}

}  // namespace pb
