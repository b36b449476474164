// The CUDA backends of parabench-micro (built with PB_CUDA): each rank's device as the apps choose it
// (its node-local rank modulo the visible devices), in fp32 (TF32 off) and with bf16 operands on the
// tensor cores (kernels/cuda/cuda_backend.h).
#include "bench/micro/backends.h"

#include <mpi.h>

#include "common/device_communicators.h"
#include "common/errors.h"
#include "common/metadata.h"
#include "kernels/cuda/cuda_backend.h"

namespace pb {

std::string add_cuda_backends(std::vector<MicroBackend>* backends, int local_rank) {
  const int devices = cuda_visible_device_count();
  if (devices == 0) return "no GPU visible: the cuda benchmarks are not registered";
  const int device = local_rank % devices;
  backends->push_back({"cuda", "fp32", true, make_cuda_backend(device, /*bf16_matmul=*/false)});
  backends->push_back({"cuda", "bf16", true, make_cuda_backend(device, /*bf16_matmul=*/true)});
  const std::string name = backends->back().backend->device_name();
  DevicePeak peak;
  if (device_peak(name, &peak)) {  // else the peak fractions stay unknown (NaN)
    for (MicroBackend* b : {&(*backends)[backends->size() - 2], &backends->back()}) {
      b->peak_flop_per_s = (b->dtype == "bf16" ? peak.bf16_tflops : peak.fp32_tflops) * 1e12;
      b->peak_bytes_per_s = peak.memory_tb_per_s * 1e12;
    }
  }
  return name;
}

std::string micro_device_id(int local_rank) {
  const int devices = cuda_visible_device_count();
  return devices > 0 ? cuda_device_pci_bus_id(local_rank % devices) : "";
}

std::unique_ptr<Communicator> make_nccl_world(std::vector<MicroBackend>& backends) {
  if (backends.empty() || backends.back().name != "cuda") return nullptr;
  MPI_Comm comm = MPI_COMM_NULL;
  PB_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));  // the NCCL communicator owns it
  try {
    constexpr double kTimeoutS = 600.0;  // the apps' default --distributed-timeout-minutes
    return make_nccl_communicator(comm, cuda_compute_stream(*backends.back().backend), kTimeoutS);
  } catch (...) {
    MPI_Comm_free(&comm);
    throw;
  }
}

}  // namespace pb
